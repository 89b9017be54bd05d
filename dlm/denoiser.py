"""The seam between the sampler and the network: a `Denoiser` gives logits at selected canvas positions.

`ModelDenoiser` is the full forward of any masked LM; the prompt-cached and prompt-isolated denoisers of
`dlm.cache` sit behind the same seam, and `as_denoiser` picks the one a `SamplerConfig` asks for.
"""

from __future__ import annotations

import torch

from dlm.cache import select_denoiser
from dlm.modeling import selected_logits, unwrap
from dlm.sampler_config import SamplerConfig


class Denoiser:
    """The seam between sampler and network: logits at selected canvas positions.

    `logits(canvas [B, L], attention_mask [B, L], select [B, L] bool, rows [B])` returns [N, V] float
    logits for the selected positions in row-major order. `rows` says which rows of the generation
    batch these are (with classifier-free guidance an unconditional copy has an id of its own), so a
    subclass can keep per-row state such as a prompt key/value cache between calls. Ids are unique for the
    sampler's lifetime (rows join and leave a running batch in the server); `forget` is told when they leave.
    Any object with `device`, `max_positions` and `logits` is a denoiser (the prompt-cached ones of `dlm.cache` are).
    """

    device: torch.device
    max_positions: int | None = None

    def logits(self, canvas: torch.Tensor, attention_mask: torch.Tensor, select: torch.Tensor,
               rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forget(self, rows: list[int]) -> None:
        """These row ids left the batch for good: drop any state kept for them (a no-op here)."""


class ModelDenoiser(Denoiser):
    """A full forward pass of any masked LM, with the MLM head run only on the selected rows."""

    def __init__(self, model: torch.nn.Module, sparse: bool = True):
        self.model = model
        self.sparse = sparse
        self.device = next(model.parameters()).device
        self.max_positions = getattr(getattr(unwrap(model), "config", None), "max_position_embeddings", None)

    def logits(self, canvas, attention_mask, select, rows):
        return selected_logits(self.model, canvas, select, attention_mask, sparse=self.sparse)


def as_denoiser(model, cfg: SamplerConfig | None = None, mask_id: int | None = None) -> Denoiser:
    """`model` itself when it is a denoiser; for a masked LM the denoiser that `cfg.prompt_cache` (default
    auto) asks for (`dlm.cache.select_denoiser`: the prompt cache, or the isolation mask of a model trained
    with prompt isolation), else a full-forward `ModelDenoiser` around it."""
    if not isinstance(model, torch.nn.Module):
        return model
    mode, block = (cfg.prompt_cache, cfg.block_length) if cfg is not None else ("auto", None)
    return select_denoiser(model, mode, mask_id, block) or ModelDenoiser(model)
