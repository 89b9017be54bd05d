"""The reverse process: from a prompt and a canvas of masks to text, in as few forward passes as possible.

One generation (DESIGN §4 "Sampling"):

    canvas = prompt ids + gen_length x [MASK]            (prompt mask spans `[MASK*n]` are decided too)
    region = canvas[first mask:]                          split into blocks of `block_length`, left to right
    repeat:  logits at the masked positions of the current block (one forward pass; the MLM head runs
             on those rows only) -> candidate x̂ and a confidence per position -> commit some of them.

How many positions a step commits is the *commit rule*:
  * fixed-step (reference, LLaDA): `steps` spread evenly over the blocks, `m // s` per step and one more
    in the first `m % s` steps, highest confidence first;
  * threshold τ: every position whose confidence is ≥ τ, at least the most confident one;
  * entropy bound γ: the largest set of positions whose summed entropy stays ≤ γ, at least one.
Which positions win is the *strategy* (the confidence): `low_confidence` = softmax(logits)[x̂],
`margin` = p1 - p2, `entropy` = exp(-H) (in (0, 1], so a threshold reads the same), `random`.

Batches: rows are right-padded (each row keeps positions 0..n-1, so absolute and rotary position
embeddings see exactly what an unbatched call sees) and every row carries its own block, step and
random generator, so a row's result does not depend on what else is in the batch. Rows that are
finished leave the forward pass. The network sits behind the `Denoiser` seam, so that a forward that
caches the prompt's keys/values can replace `ModelDenoiser` without touching the sampler.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from dlm.errors import UsageError
from dlm.policies import commit_mask, decide, fixed_step_schedule
from dlm.prompts import Prompt, encode_prompt, stop_ids_for

logger = logging.getLogger(__name__)

STRATEGIES = ("low_confidence", "random", "margin", "entropy")


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


@dataclass
class SampleResult:
    """One generation. `prompt_ids` is every token before the first generated position."""

    prompt_ids: list[int]
    output_ids: list[int]        # the canvas from the first generated position to its end
    text: str                    # output decoded up to the first generated end-of-turn/EOS
    nfe: int                     # forward passes run for this row (2 per step with CFG)
    steps: int                   # denoising steps (commit rounds)
    seconds: float               # wall time until this row was finished
    num_generated: int           # positions that were masks and are now decided
    history: list[list[int]] | None = None  # output region after each step (masks visible), first = blank

    @property
    def tokens_per_forward(self) -> float:
        return self.num_generated / max(self.nfe, 1)


@dataclass
class StepEvent:
    """What `on_step` sees after every step: the whole batch, rows in prompt order.

    `canvases` (each row's output region, mask id where undecided) and `remaining` (masks left per
    row) are read from the device on first access only, so a listener that skips a frame costs nothing.
    """

    step: int
    nfe: list[int]
    done: list[bool]
    total: list[int]             # masks at the start per row
    mask_id: int
    _snapshot: torch.Tensor = field(repr=False)
    _spans: list[tuple[int, int]] = field(repr=False)

    @cached_property
    def canvases(self) -> list[list[int]]:
        rows = self._snapshot.tolist()
        return [row[a:b] for row, (a, b) in zip(rows, self._spans)]

    @cached_property
    def remaining(self) -> list[int]:
        return [sum(t == self.mask_id for t in region) for region in self.canvases]


class Denoiser:
    """The seam between sampler and network: logits at selected canvas positions.

    `logits(canvas [B, L], attention_mask [B, L], select [B, L] bool, rows [B])` returns [N, V] float
    logits for the selected positions in row-major order. `rows` says which rows of the generation
    batch these are (with classifier-free guidance the unconditional copies are numbered B..2B-1), so a
    subclass can keep per-row state such as a prompt key/value cache between calls.
    """

    device: torch.device
    max_positions: int | None = None

    def logits(self, canvas: torch.Tensor, attention_mask: torch.Tensor, select: torch.Tensor,
               rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ModelDenoiser(Denoiser):
    """A full forward pass of any masked LM, with the MLM head run only on the selected rows."""

    def __init__(self, model: torch.nn.Module, sparse: bool = True):
        from dlm.modeling import unwrap

        self.model = model
        self.sparse = sparse
        self.device = next(model.parameters()).device
        self.max_positions = getattr(getattr(unwrap(model), "config", None), "max_position_embeddings", None)

    def logits(self, canvas, attention_mask, select, rows):
        from dlm.modeling import selected_logits

        return selected_logits(self.model, canvas, select, attention_mask, sparse=self.sparse)


# ---------------------------------------------------------------------------------------------------------
# The sampler


@dataclass
class _Row:
    prompt_len: int      # region start: first mask position
    length: int          # canvas length of this row
    tail_start: int      # after the last fixed token: early stop may fill from here on
    block: int
    n_blocks: int
    steps_per_block: int
    total_masks: int
    generator: torch.Generator
    block_index: int = 0
    step_in_block: int = 0
    schedule: list[int] | None = None
    done: bool = False
    nfe: int = 0
    steps: int = 0
    seconds: float = 0.0
    history: list[list[int]] | None = field(default=None)


def generate(model, tokenizer, prompts: Sequence[Prompt], config: SamplerConfig | None = None, *,
             chat: bool = True, seed: int | None = None, return_history: bool = False,
             on_step: Callable[[StepEvent], None] | None = None,
             batch_size: int | None = None) -> list[SampleResult]:
    """Generate for every prompt; prompts of different lengths share one forward pass per step.

    `model` is a masked LM (any wrapper) or a `Denoiser`. Row i draws its randomness from its own
    generator seeded `seed + i` (from torch's global RNG when `seed` is None), so a batched result
    equals the unbatched call with the same per-row seed. `batch_size` splits long lists into chunks
    without changing any result. `on_step` is called after every step with a `StepEvent`.
    """
    config = (config or SamplerConfig()).validate()
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    if batch_size is None or batch_size >= len(prompts):
        return _generate_batch(model, tokenizer, list(prompts), config, chat, seed, return_history, on_step)
    results = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        results += _generate_batch(model, tokenizer, chunk, config, chat, seed + start, return_history, on_step)
    return results


@torch.inference_mode()
def _generate_batch(model, tokenizer, prompts: list[Prompt], cfg: SamplerConfig, chat: bool, seed: int,
                    return_history: bool, on_step) -> list[SampleResult]:
    if not prompts:
        return []
    denoiser = model if isinstance(model, Denoiser) else ModelDenoiser(model)
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()  # dropout would make "committed by confidence" meaningless
    try:
        return _Sampler(denoiser, tokenizer, prompts, cfg, chat, seed, return_history, on_step).run()
    finally:
        if was_training:
            model.train()


class _Sampler:
    def __init__(self, denoiser: Denoiser, tokenizer, prompts, cfg: SamplerConfig, chat, seed,
                 return_history, on_step):
        self.denoiser, self.tokenizer, self.cfg, self.on_step = denoiser, tokenizer, cfg, on_step
        mask_id = tokenizer.mask_token_id
        if mask_id is None:
            raise UsageError("the tokenizer has no mask token, so it cannot be used as a masked diffusion model")
        self.mask_id = mask_id
        self.stop_ids = stop_ids_for(tokenizer)
        self.fill_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else mask_id
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.fill_id
        device = denoiser.device

        canvases, self.rows = [], []
        for i, prompt in enumerate(prompts):
            ids = encode_prompt(tokenizer, prompt, chat)
            where = f" (prompt {i + 1})" if len(prompts) > 1 else ""
            if cfg.seq_len is not None:
                n_gen = cfg.seq_len - len(ids)
                if n_gen < 1:
                    raise UsageError(f"--seq_len {cfg.seq_len} leaves no room to generate: the prompt{where} "
                                     f"is {len(ids)} tokens; use a larger --seq_len or --gen_length")
            else:
                n_gen = cfg.gen_length
            row_ids = ids + [mask_id] * n_gen
            is_mask = [t == mask_id for t in row_ids]
            if not any(is_mask):
                raise UsageError(f"nothing to generate{where}: --gen_length is 0 and the prompt has no [MASK*n] span")
            if denoiser.max_positions and len(row_ids) > denoiser.max_positions:
                raise UsageError(f"canvas of {len(row_ids)} tokens{where} exceeds the model's "
                                 f"{denoiser.max_positions} positions: lower --seq_len/--gen_length")
            start = is_mask.index(True)
            fixed_after = [j for j in range(start, len(row_ids)) if not is_mask[j]]
            block, n_blocks, spb = cfg.layout(len(row_ids) - start, where)
            gen = torch.Generator(device=device).manual_seed(seed + i)
            self.rows.append(_Row(prompt_len=start, length=len(row_ids),
                                  tail_start=(fixed_after[-1] + 1) if fixed_after else start,
                                  block=block, n_blocks=n_blocks, steps_per_block=spb,
                                  total_masks=sum(is_mask), generator=gen,
                                  history=[] if return_history else None))
            canvases.append(row_ids)

        width = max(len(c) for c in canvases)
        B = len(canvases)
        self.canvas = torch.full((B, width), pad_id, dtype=torch.long)
        self.attention = torch.zeros((B, width), dtype=torch.long)
        self.block_of = torch.full((B, width), -1, dtype=torch.long)  # block index, -1 outside the region
        self.tail = torch.zeros((B, width), dtype=torch.bool)          # where early stop may fill EOS
        for b, (ids, row) in enumerate(zip(canvases, self.rows)):
            n = len(ids)
            self.canvas[b, :n] = torch.tensor(ids)
            self.attention[b, :n] = 1
            self.block_of[b, row.prompt_len:n] = torch.arange(n - row.prompt_len) // row.block
            self.tail[b, row.tail_start:n] = True
        self.fixed = (self.canvas != mask_id) & self.attention.bool()
        self.canvas, self.attention, self.block_of, self.tail, self.fixed = (
            t.to(device) for t in (self.canvas, self.attention, self.block_of, self.tail, self.fixed))
        self.stop_tensor = torch.tensor(self.stop_ids, dtype=torch.long, device=device)
        self.passes = 2 if cfg.cfg_scale > 0 else 1
        self.t0 = time.perf_counter()
        self.step = 0
        if return_history:
            for b, row in enumerate(self.rows):
                row.history.append(self._region(b))

    def _region(self, b: int) -> list[int]:
        row = self.rows[b]
        return self.canvas[b, row.prompt_len:row.length].tolist()

    def _finish(self, row: _Row) -> None:
        row.done = True
        row.seconds = time.perf_counter() - self.t0

    def _advance(self) -> None:
        """Move each row past finished blocks; in fixed-step mode, past steps that commit nothing."""
        while True:
            current = torch.tensor([r.block_index for r in self.rows], device=self.canvas.device)
            left = ((self.canvas == self.mask_id) & (self.block_of == current[:, None])).sum(1).tolist()
            moved = False
            for row, m in zip(self.rows, left):
                if row.done:
                    continue
                if row.block_index >= row.n_blocks:
                    self._finish(row)
                elif m == 0:
                    row.block_index += 1
                    row.schedule, row.step_in_block = None, 0
                    moved = True
                elif not self.cfg.adaptive:
                    if row.schedule is None:  # schedule fixed by the masks present when the block starts
                        row.schedule = fixed_step_schedule(m, row.steps_per_block)
                    # A zero-commit step would leave the canvas unchanged: skip its forward pass.
                    while row.schedule[row.step_in_block] == 0:
                        row.step_in_block += 1
            if not moved:
                return

    def run(self) -> list[SampleResult]:
        while True:
            self._advance()
            active = [b for b, r in enumerate(self.rows) if not r.done]
            if not active:
                break
            self._step(active)
            self.step += 1
            if self.on_step is not None:
                self.on_step(self._event())
        return [self._result(b) for b in range(len(self.rows))]

    def _step(self, active: list[int]) -> None:
        cfg, rows = self.cfg, self.rows
        idx = torch.tensor(active, device=self.canvas.device)
        width = max(rows[b].length for b in active)
        canvas = self.canvas[idx, :width]
        attention = self.attention[idx, :width]
        current = torch.tensor([rows[b].block_index for b in active], device=canvas.device)
        select = (canvas == self.mask_id) & (self.block_of[idx, :width] == current[:, None])

        if cfg.cfg_scale > 0:
            # Unconditional copy: every fixed token (the prompt) masked, as in the reference.
            uncond = canvas.masked_fill(self.fixed[idx, :width], self.mask_id)
            both = self.denoiser.logits(torch.cat([canvas, uncond]), torch.cat([attention, attention]),
                                        torch.cat([select, select]), torch.cat([idx, idx + len(rows)])).float()
            cond, unc = both.chunk(2)
            logits = unc + (cfg.cfg_scale + 1) * (cond - unc)
        else:
            # Kept in the model's dtype: `decide` converts chunk by chunk, never the whole [N, V] at once.
            logits = self.denoiser.logits(canvas, attention, select, idx)
        logits[:, self.mask_id] = float("-inf")  # committing a mask would leave the position undecided

        segments = ()
        if cfg.temperature > 0 or cfg.strategy == "random":
            # The one host sync before the commit: each row's count, to draw from its own generator.
            segments = list(zip(select.sum(1).tolist(), (rows[b].generator for b in active)))
        decision = decide(logits, cfg.temperature, cfg.strategy, segments, cfg.top_k, cfg.top_p,
                          need_entropy=cfg.entropy_bound is not None)
        del logits

        score = torch.full(select.shape, float("-inf"), device=canvas.device)
        score[select] = decision.confidence
        if cfg.entropy_bound is not None:
            # Largest set under the bound = the lowest-entropy positions while the running sum fits.
            ent = torch.full(select.shape, float("inf"), device=canvas.device)
            ent[select] = decision.entropy
            score = -ent
            fits = (ent.sort(dim=1).values.cumsum(1) <= cfg.entropy_bound).sum(1)
            counts = fits.clamp(min=1)
        elif cfg.threshold is not None:
            counts = (score >= cfg.threshold).sum(1).clamp(min=1)
        else:
            counts = torch.tensor([rows[b].schedule[rows[b].step_in_block] for b in active], device=canvas.device)
        commit = commit_mask(select, score, counts)

        proposal = torch.zeros_like(canvas)
        proposal[select] = decision.candidates
        canvas = torch.where(commit, proposal, canvas)
        if cfg.stop_at_eos and self.stop_ids:
            canvas = self._early_stop(canvas, idx, width)
        self.canvas[idx, :width] = canvas

        # One host sync after the commit. A row stopped early has no mask left, so it is complete too.
        complete = ~(canvas == self.mask_id).any(1)
        for b, finished in zip(active, complete.tolist()):
            row = rows[b]
            row.nfe += self.passes
            row.steps += 1
            if not cfg.adaptive:
                row.step_in_block += 1
            if row.history is not None:
                row.history.append(self._region(b))
            if finished and not row.done:
                self._finish(row)

    def _early_stop(self, canvas: torch.Tensor, idx: torch.Tensor, width: int) -> torch.Tensor:
        """Rows whose first generated stop token has only decided positions before it: fill the rest
        of their masks with EOS, which leaves them complete (no more forward passes). No host sync."""
        cols = torch.arange(width, device=canvas.device).expand_as(canvas)
        is_stop = torch.isin(canvas, self.stop_tensor) & ~self.fixed[idx, :width] & self.tail[idx, :width]
        first = torch.where(is_stop, cols, width).min(1).values
        undecided_before = ((canvas == self.mask_id) & (cols < first[:, None])).any(1)
        stopped = (first < width) & ~undecided_before
        fill = stopped[:, None] & (cols > first[:, None]) & (canvas == self.mask_id)
        return canvas.masked_fill(fill, self.fill_id)

    def _event(self) -> StepEvent:
        # A device copy of the canvas, read back only if the listener looks at the canvases.
        spans = [(r.prompt_len, r.length) for r in self.rows]
        return StepEvent(step=self.step, nfe=[r.nfe for r in self.rows], done=[r.done for r in self.rows],
                         total=[r.total_masks for r in self.rows], mask_id=self.mask_id,
                         _snapshot=self.canvas.clone(), _spans=spans)

    def _result(self, b: int) -> SampleResult:
        row = self.rows[b]
        ids = self.canvas[b, :row.length].tolist()
        generated = (~self.fixed[b, row.prompt_len:row.length]).tolist()
        output = ids[row.prompt_len:]
        end = next((j for j, (t, g) in enumerate(zip(output, generated)) if g and t in self.stop_ids), len(output))
        text = self.tokenizer.decode(output[:end], skip_special_tokens=True)
        decided = sum(1 for t, g in zip(output, generated) if g and t != self.mask_id)
        return SampleResult(prompt_ids=ids[:row.prompt_len], output_ids=output, text=text, nfe=row.nfe,
                            steps=row.steps, seconds=row.seconds, num_generated=decided, history=row.history)
