"""Prompt isolation: an attention mask under which the prompt's hidden states do not depend on the canvas.

With the mask, a prompt position attends only to prompt positions, while every position after the prompt
(the answer, its end-of-turn and EOS tail, and padding counted as answer) attends to everything:

    allowed(q, k) = k < P  or  q >= P          (P = prompt length of the row)

on top of the model's own pattern (padding, and ModernBERT's sliding window on its local layers). A model
trained this way computes the same prompt keys/values whatever the canvas holds, so a sampler may compute
them once per generation (`dlm.cache`) and get exactly the logits of the full forward.

Where the prompt ends:
  * SFT rows: at the start of the *last* answer run (the last assistant turn; padding after it counts as
    answer). A single-turn row's prompt is everything before its answer; in a multi-turn row the earlier
    turns belong to the prompt, exactly as in `inference.py --chat`, where the history is the prompt.
  * pretraining rows: at a split point drawn per row, uniform over {0, ..., L-1} (0 = no prompt, plain
    bidirectional attention), so that a pretrained model is ready for the cache before SFT.

The mask is built by transformers' own mask factories (`create_bidirectional_mask` and, for ModernBERT's
local layers, `create_bidirectional_sliding_window_mask`) with the rule above as an extra `and` condition;
ModernBERT takes the per-layer-type mapping, BERT and RoBERTa the 4D mask. The setting is stored in the
model config (`config.prompt_isolation`, so `from_pretrained` alone restores it) and in `dlm.json`.
"""

from __future__ import annotations

import torch

from dlm.errors import UsageError
from dlm.modeling import unwrap

CONFIG_KEY = "prompt_isolation"
# Encoders whose self-attention takes a prepared 4D mask (or ModernBERT's per-layer-type mapping).
SUPPORTED = ("ModernBertForMaskedLM", "BertForMaskedLM", "RobertaForMaskedLM", "XLMRobertaForMaskedLM",
             "CamembertForMaskedLM")


def is_isolated(model: torch.nn.Module) -> bool:
    """True when the model was trained with the prompt-isolation mask (recorded in its config)."""
    return bool(getattr(getattr(unwrap(model), "config", None), CONFIG_KEY, False))


def mark_isolated(model: torch.nn.Module, isolated: bool) -> None:
    """Record the training mode in the config (saved to config.json), overriding a loaded checkpoint's."""
    config = unwrap(model).config
    if isolated or hasattr(config, CONFIG_KEY):
        setattr(config, CONFIG_KEY, bool(isolated))


def check_supported(model: torch.nn.Module, flag: str = "--prompt_isolation") -> None:
    """Refuse architectures and attention kernels that cannot take the isolation mask."""
    base = unwrap(model)
    name = type(base).__name__
    if name not in SUPPORTED:
        raise UsageError(f"{flag}: not available for {name} (supported: ModernBERT, BERT, RoBERTa)")
    impl = getattr(base.config, "_attn_implementation", None) or "sdpa"
    if "flash" in impl:
        raise UsageError(f"{flag}: the {impl} kernel takes no attention mask; load the model with "
                         f"attn_implementation='sdpa'")


def prompt_lengths(answer_mask: torch.Tensor) -> torch.Tensor:
    """Per-row prompt length [B]: the start of the last run of answer positions (0 when the row starts with it)."""
    answer = answer_mask.bool()
    starts = answer.clone()
    starts[:, 1:] &= ~answer[:, :-1]
    cols = torch.arange(answer.shape[1], device=answer.device).expand_as(answer)
    return torch.where(starts, cols, 0).amax(1)


def random_prompt_lengths(count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Pretraining split points: P ~ U{0, ..., length-1} per row, drawn from `generator` (on its device)."""
    u = torch.rand(count, generator=generator, device=generator.device)
    return (u * length).long().clamp(max=length - 1)


def isolation_attention_mask(model: torch.nn.Module, input_ids: torch.Tensor, prompt_len: torch.Tensor,
                             attention_mask: torch.Tensor | None = None):
    """What to pass as `attention_mask=` for the isolated forward of `input_ids` [B, L].

    `prompt_len` [B] is each row's prompt length, `attention_mask` the optional 2D padding mask. Returns a
    {layer type: 4D mask} mapping for ModernBERT (its local layers keep their sliding window) and a 4D mask
    for the other encoders; the format is the one the model's attention kernel expects.
    """
    from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask

    base = unwrap(model)
    config = base.config
    prompt_len = prompt_len.to(input_ids.device)

    def prompt_sees_only_prompt(batch_idx, head_idx, q_idx, kv_idx):
        p = prompt_len[batch_idx]
        return (kv_idx < p) | (q_idx >= p)

    dtype = next(base.parameters()).dtype
    shape_only = torch.empty((*input_ids.shape, 1), dtype=dtype, device=input_ids.device)  # only shape/dtype read
    kwargs = {"config": config, "inputs_embeds": shape_only, "attention_mask": attention_mask,
              "and_mask_function": prompt_sees_only_prompt}
    if type(base).__name__ == "ModernBertForMaskedLM":
        return {"full_attention": create_bidirectional_mask(**kwargs),
                "sliding_attention": create_bidirectional_sliding_window_mask(**kwargs)}
    return create_bidirectional_mask(**kwargs)


def batch_isolation_mask(model: torch.nn.Module, input_ids: torch.Tensor, maskable: torch.Tensor, pretrain: bool,
                         generator: torch.Generator, world: int = 1, rank: int = 0,
                         attention_mask: torch.Tensor | None = None):
    """The isolation mask of a training batch: SFT rows split before their last answer run, pretraining rows
    at split points drawn for the global batch of `world` ranks (this rank keeps its rows, so every rank and
    a resumed run draw the same ones)."""
    b, length = input_ids.shape
    if pretrain:
        split = random_prompt_lengths(world * b, length, generator)[rank * b:(rank + 1) * b]
    else:
        split = prompt_lengths(maskable)
    return isolation_attention_mask(model, input_ids, split.to(input_ids.device), attention_mask)
