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

import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from dlm.denoiser import Denoiser, ModelDenoiser, as_denoiser  # noqa: F401 (re-exported)
from dlm.errors import UsageError
from dlm.policies import commit_mask, decide, fixed_step_schedule
from dlm.prompts import Prompt, encode_prompt, stop_ids_for
from dlm.sampler_config import STRATEGIES, SamplerConfig  # noqa: F401 (re-exported: the sampler's settings)

logger = logging.getLogger(__name__)


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


# ---------------------------------------------------------------------------------------------------------
# The sampler

_BATCH_TENSORS = {"canvas": torch.long, "attention": torch.long, "block_of": torch.long, "tail": torch.bool,
                  "fixed": torch.bool}
_PADDING = {"attention": 0, "block_of": -1, "tail": False, "fixed": False}  # the canvas pads with pad_id


@dataclass
class _Row:
    id: int              # unique for the sampler's lifetime: the Denoiser's `rows` and `release` name it
    cfg: SamplerConfig   # this row's own settings (rows of one batch may differ)
    prompt_len: int      # region start: first mask position
    length: int          # canvas length of this row
    tail_start: int      # after the last fixed token: early stop may fill from here on
    block: int
    n_blocks: int
    steps_per_block: int
    total_masks: int
    generator: torch.Generator
    t0: float = 0.0      # when the row joined
    uncond_id: int | None = None  # id of its unconditional copy (classifier-free guidance), given on first use
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
    denoiser = as_denoiser(model, cfg, tokenizer.mask_token_id)
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()  # dropout would make "committed by confidence" meaningless
    try:
        sampler = _Sampler(denoiser, tokenizer, on_step)
        for i, prompt in enumerate(prompts):
            sampler.add(prompt, cfg, chat=chat, seed=seed + i, return_history=return_history,
                        where=f" (prompt {i + 1})" if len(prompts) > 1 else "")
        return sampler.run()
    finally:
        if was_training:
            model.train()


class _Sampler:
    """A running batch of rows, each with its own settings, generator and progress.

    `add` puts a row in (at a step boundary: between two `step_once` calls), `step_once` runs one
    forward pass shared by every unfinished row and lets each row commit by its own rule, `release`
    takes a row out (finished or abandoned). `generate` adds all its prompts, then steps until every
    row is done; the server adds and releases rows while the batch runs (DESIGN §4 "Serving"). A row's
    tokens never depend on its neighbours: padding keeps positions, decisions are per row.
    """

    def __init__(self, denoiser: Denoiser, tokenizer, on_step: Callable[[StepEvent], None] | None = None,
                 ids: Iterator[int] | None = None):
        # `ids`: where row ids come from; batches that share one (the server's, one per prompt-cache mode)
        # never reuse each other's ids.
        self.denoiser, self.tokenizer, self.on_step = denoiser, tokenizer, on_step
        self._ids = ids if ids is not None else itertools.count()
        mask_id = tokenizer.mask_token_id
        if mask_id is None:
            raise UsageError("the tokenizer has no mask token, so it cannot be used as a masked diffusion model")
        self.mask_id = mask_id
        self.stop_ids = stop_ids_for(tokenizer)
        self.fill_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else mask_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.fill_id
        device = denoiser.device
        self.rows: list[_Row] = []
        # Batch tensors [rows, longest row]: canvas, attention, block index (-1 outside the region),
        # where early stop may fill EOS, and the tokens given (never generated). Rows join via `_append`.
        for name, dtype in _BATCH_TENSORS.items():
            setattr(self, name, torch.zeros((0, 0), dtype=dtype, device=device))
        self.stop_tensor = torch.tensor(self.stop_ids, dtype=torch.long, device=device)
        self.step = 0

    @torch.inference_mode()
    def add(self, prompt: Prompt, cfg: SamplerConfig, *, chat: bool = True, seed: int | None = None,
            generator: torch.Generator | None = None, return_history: bool = False, where: str = "") -> int:
        """Put one row in the batch (it takes part from the next step on) and return its id.

        `cfg` must be validated; randomness comes from `generator`, else a new one seeded `seed`.
        A `UsageError` (canvas too long, nothing to generate, bad block layout) leaves the batch unchanged.
        """
        mask_id = self.mask_id
        ids = encode_prompt(self.tokenizer, prompt, chat)
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
        limit = self.denoiser.max_positions
        if limit and len(row_ids) > limit:
            if len(ids) >= limit:  # no --seq_len/--gen_length could help: blame the prompt
                raise UsageError(f"the prompt{where} is {len(ids)} tokens and the model has {limit} positions: "
                                 f"no room left to generate, shorten the prompt")
            raise UsageError(f"canvas of {len(row_ids)} tokens{where} ({len(ids)} prompt + {n_gen} generated) "
                             f"exceeds the model's {limit} positions: lower --seq_len/--gen_length "
                             f"to at most {limit - len(ids)} generated tokens")
        start = is_mask.index(True)
        fixed_after = [j for j in range(start, len(row_ids)) if not is_mask[j]]
        block, n_blocks, spb = cfg.layout(len(row_ids) - start, where)
        if generator is None:
            if seed is None:
                seed = int(torch.randint(0, 2**62, ()).item())
            generator = torch.Generator(device=self.denoiser.device).manual_seed(seed)
        row = _Row(id=next(self._ids), cfg=cfg, prompt_len=start, length=len(row_ids),
                   tail_start=(fixed_after[-1] + 1) if fixed_after else start,
                   block=block, n_blocks=n_blocks, steps_per_block=spb,
                   total_masks=sum(is_mask), generator=generator, t0=time.perf_counter(),
                   history=[] if return_history else None)
        self._append(row_ids, row)
        if return_history:
            row.history.append(self._region(len(self.rows) - 1))
        return row.id

    def _append(self, ids: list[int], row: _Row) -> None:
        """One more row in the batch tensors, every row right-padded to the longest."""
        pos = torch.arange(len(ids), device=self.canvas.device)
        canvas = torch.tensor(ids, device=self.canvas.device)
        new = {"canvas": canvas, "attention": torch.ones_like(canvas), "tail": pos >= row.tail_start,
               "block_of": torch.where(pos >= row.prompt_len, (pos - row.prompt_len) // row.block, -1),
               "fixed": canvas != self.mask_id}
        width = max(self.canvas.shape[1], len(ids))
        for name, value in new.items():
            old, fill = getattr(self, name), self.pad_id if name == "canvas" else _PADDING[name]
            pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=fill)  # noqa: E731
            setattr(self, name, torch.cat([pad(old), pad(value)[None]]))
        self.rows.append(row)

    @torch.inference_mode()
    def release(self, row_id: int) -> None:
        """Take a row out of the batch (finished, or its client left); the others keep their state."""
        b = self.index(row_id)
        row = self.rows.pop(b)
        keep = torch.tensor([i for i in range(len(self.rows) + 1) if i != b], dtype=torch.long,
                            device=self.canvas.device)
        width = max((r.length for r in self.rows), default=0)  # shrink to the longest remaining row
        for name in _BATCH_TENSORS:
            setattr(self, name, getattr(self, name)[keep, :width])
        forget = getattr(self.denoiser, "forget", None)  # optional: a denoiser may keep no per-row state
        if forget is not None:
            forget([row.id] + ([row.uncond_id] if row.uncond_id is not None else []))

    def index(self, row_id: int) -> int:
        """Position of a row in the batch tensors (positions shift when rows leave)."""
        for b, row in enumerate(self.rows):
            if row.id == row_id:
                return b
        raise KeyError(row_id)

    def _region(self, b: int) -> list[int]:
        row = self.rows[b]
        return self.canvas[b, row.prompt_len:row.length].tolist()

    def region(self, row_id: int) -> list[int]:
        return self._region(self.index(row_id))

    def result(self, row_id: int) -> SampleResult:
        """A row's generation so far (final once the row is done)."""
        return self._result(self.index(row_id))

    def _finish(self, row: _Row) -> None:
        row.done = True
        row.seconds = time.perf_counter() - row.t0

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
                elif not row.cfg.adaptive:
                    if row.schedule is None:  # schedule fixed by the masks present when the block starts
                        row.schedule = fixed_step_schedule(m, row.steps_per_block)
                    # A zero-commit step would leave the canvas unchanged: skip its forward pass.
                    while row.schedule[row.step_in_block] == 0:
                        row.step_in_block += 1
            if not moved:
                return

    @torch.inference_mode()
    def step_once(self) -> bool:
        """One denoising step for every unfinished row; False (and no forward pass) when none is left."""
        self._advance()
        active = [b for b, r in enumerate(self.rows) if not r.done]
        if not active:
            return False
        self._step(active)
        self.step += 1
        return True

    def run(self) -> list[SampleResult]:
        while self.step_once():
            if self.on_step is not None:
                self.on_step(self._event())
        return [self._result(b) for b in range(len(self.rows))]

    def _logits(self, active: list[int], idx: torch.Tensor, canvas: torch.Tensor, attention: torch.Tensor,
                select: torch.Tensor) -> torch.Tensor:
        """[N, V] float logits at the selected positions; rows with guidance get
        u + (w + 1) * (c - u) from an unconditional copy that shares the same forward pass."""
        rows, width = self.rows, canvas.shape[1]
        ids = torch.tensor([rows[b].id for b in active], device=canvas.device)
        guided = [j for j, b in enumerate(active) if rows[b].cfg.cfg_scale > 0]
        if not guided:
            # Kept in the model's dtype: `decide` converts chunk by chunk, never the whole [N, V] at once.
            return self.denoiser.logits(canvas, attention, select, ids)
        for j in guided:
            if rows[active[j]].uncond_id is None:
                rows[active[j]].uncond_id = next(self._ids)
        g = torch.tensor(guided, device=canvas.device)
        # Unconditional copy: every fixed token (the prompt) masked, as in the reference.
        uncond = canvas[g].masked_fill(self.fixed[idx[g], :width], self.mask_id)
        uncond_ids = torch.tensor([rows[active[j]].uncond_id for j in guided], device=canvas.device)
        both = self.denoiser.logits(torch.cat([canvas, uncond]), torch.cat([attention, attention[g]]),
                                    torch.cat([select, select[g]]), torch.cat([ids, uncond_ids])).float()
        n = int(select.sum())
        cond, unc = both[:n], both[n:]
        counts = select.sum(1)  # per row; expanded to one entry per selected position, row-major
        factor = torch.tensor([rows[b].cfg.cfg_scale + 1 for b in active], device=canvas.device)
        factor = factor.repeat_interleave(counts)
        is_guided = torch.tensor([rows[b].cfg.cfg_scale > 0 for b in active], device=canvas.device)
        is_guided = is_guided.repeat_interleave(counts)
        cond[is_guided] = unc + factor[is_guided, None] * (cond[is_guided] - unc)
        return cond

    def _step(self, active: list[int]) -> None:
        rows = self.rows
        idx = torch.tensor(active, device=self.canvas.device)
        width = max(rows[b].length for b in active)
        canvas = self.canvas[idx, :width]
        attention = self.attention[idx, :width]
        current = torch.tensor([rows[b].block_index for b in active], device=canvas.device)
        select = (canvas == self.mask_id) & (self.block_of[idx, :width] == current[:, None])
        logits = self._logits(active, idx, canvas, attention, select)
        logits[:, self.mask_id] = float("-inf")  # committing a mask would leave the position undecided

        # Rows with the same decision settings decide together; each draws from its own generator.
        groups: dict[tuple, list[int]] = {}
        for j, b in enumerate(active):
            groups.setdefault(_decision_key(rows[b].cfg), []).append(j)
        if len(groups) == 1:
            canvas = self._decide(rows[active[0]].cfg, active, idx, canvas, select, logits, width)
        else:
            owner = torch.arange(len(active), device=canvas.device).repeat_interleave(select.sum(1))
            for members in groups.values():
                m = torch.tensor(members, device=canvas.device)
                sub = [active[j] for j in members]
                canvas[m] = self._decide(rows[sub[0]].cfg, sub, idx[m], canvas[m], select[m],
                                         logits[torch.isin(owner, m)], width)
        del logits
        self.canvas[idx, :width] = canvas

        # One host sync after the commit. A row stopped early has no mask left, so it is complete too.
        complete = ~(canvas == self.mask_id).any(1)
        for b, finished in zip(active, complete.tolist()):
            row = rows[b]
            row.nfe += 2 if row.cfg.cfg_scale > 0 else 1
            row.steps += 1
            if not row.cfg.adaptive:
                row.step_in_block += 1
            if row.history is not None:
                row.history.append(self._region(b))
            if finished and not row.done:
                self._finish(row)

    def _decide(self, cfg: SamplerConfig, active: list[int], idx: torch.Tensor, canvas: torch.Tensor,
                select: torch.Tensor, logits: torch.Tensor, width: int) -> torch.Tensor:
        """Candidates, confidences and commits for rows sharing one set of decision settings."""
        rows = self.rows
        segments = ()
        if cfg.temperature > 0 or cfg.strategy == "random":
            # The one host sync before the commit: each row's count, to draw from its own generator.
            segments = list(zip(select.sum(1).tolist(), (rows[b].generator for b in active)))
        decision = decide(logits, cfg.temperature, cfg.strategy, segments, cfg.top_k, cfg.top_p,
                          need_entropy=cfg.entropy_bound is not None)

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
        return canvas

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


def _decision_key(cfg: SamplerConfig) -> tuple:
    """The settings that shape a step's decisions (layout and guidance live in the row)."""
    return (cfg.strategy, cfg.threshold, cfg.entropy_bound, cfg.temperature, cfg.top_k, cfg.top_p, cfg.stop_at_eos)


# The public name of the running batch that the server drives step by step.
RunningBatch = _Sampler
