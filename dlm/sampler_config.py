"""The sampler's settings: how many masks, which commit rule, which confidence, temperature, guidance.

Kept apart from the sampler itself so that front ends and the server can check a request's settings (and
their block layout) without a model; `dlm.sampling` re-exports `SamplerConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dlm.errors import UsageError

STRATEGIES = ("low_confidence", "random", "margin", "entropy")
PROMPT_CACHE_MODES = ("auto", "off", "exact", "approx")  # the denoiser: dlm.cache.select_denoiser


@dataclass
class SamplerConfig:
    """How to denoise. Field errors name the inference.py flag (`steps` is `--num_steps`)."""

    gen_length: int = 128           # masks appended after the prompt
    seq_len: int | None = None      # total canvas instead: each prompt gets seq_len - len(prompt) masks
    steps: int | None = None        # fixed-step budget over all blocks; None = one commit per step
    block_length: int | None = None  # semi-autoregressive block size; None = one block
    strategy: str = "low_confidence"
    threshold: float | None = None       # τ: parallel decoding by confidence
    entropy_bound: float | None = None   # γ: parallel decoding by summed entropy
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float = 0.0
    stop_at_eos: bool = True
    prompt_cache: str = "auto"      # auto | off | exact | approx (DESIGN §4 "Prompt isolation and the prompt cache")

    @property
    def adaptive(self) -> bool:
        """True when the number of forward passes adapts (threshold or entropy bound)."""
        return self.threshold is not None or self.entropy_bound is not None

    def validate(self) -> SamplerConfig:
        """Check every field on its own, and the block layout when the generated length is known."""
        if self.seq_len is not None and self.seq_len < 1:
            raise UsageError(f"--seq_len must be at least 1, got {self.seq_len}")
        if self.gen_length < 0:
            raise UsageError(f"--gen_length must be at least 0, got {self.gen_length}")
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"--num_steps must be at least 1, got {self.steps}")
        if self.block_length is not None and self.block_length < 1:
            raise UsageError(f"--block_length must be at least 1, got {self.block_length}")
        if self.strategy not in STRATEGIES:
            raise UsageError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise UsageError(f"--threshold must be in (0, 1], got {self.threshold}")
        if self.entropy_bound is not None and self.entropy_bound <= 0:
            raise UsageError(f"--entropy_bound must be positive, got {self.entropy_bound}")
        if self.threshold is not None and self.entropy_bound is not None:
            raise UsageError("--threshold and --entropy_bound are two commit rules: pass one of them")
        if self.threshold is not None and self.strategy == "random":
            raise UsageError("--threshold needs a confidence: use --strategy low_confidence, margin or entropy")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise UsageError(f"--temperature must be a finite number ≥ 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"--top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UsageError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.cfg_scale < 0:
            raise UsageError(f"--cfg_scale must be ≥ 0, got {self.cfg_scale}")
        if self.prompt_cache not in PROMPT_CACHE_MODES:
            raise UsageError(f"--prompt_cache must be one of {', '.join(PROMPT_CACHE_MODES)}, "
                             f"got {self.prompt_cache!r}")
        if self.seq_len is None and self.gen_length > 0:
            self.layout(self.gen_length)
        return self

    def layout(self, region_length: int, where: str = "") -> tuple[int, int, int]:
        """(block_length, number of blocks, steps per block) for a region of `region_length` positions.

        The last block may be shorter when `block_length` does not divide the region; steps must
        spread evenly over the blocks, as in the reference sampler.
        """
        block = self.block_length or region_length
        if block > region_length:
            raise UsageError(f"--block_length {block} is larger than the generated length {region_length}{where}")
        n_blocks = -(-region_length // block)
        steps = self.steps if self.steps is not None else n_blocks * block
        if steps % n_blocks:
            lower = max(n_blocks, steps // n_blocks * n_blocks)
            raise UsageError(f"--num_steps {steps} does not divide over {n_blocks} blocks of {block} "
                             f"(generated length {region_length}{where}): use a multiple of {n_blocks}, "
                             f"such as {lower} or {lower + n_blocks}")
        return block, n_blocks, steps // n_blocks
