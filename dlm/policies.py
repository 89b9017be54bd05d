"""Per-position decisions of one denoising step: the candidate token, its confidence, and which positions commit.

DESIGN §4 "Sampling": x̂ = argmax(logits / T + Gumbel) (T = 0 is argmax), a confidence per strategy, and the
commit rules (the reference fixed-step schedule, highest-score-first selection).

`decide` is what a sampler step calls: it works through the [N, V] logits in chunks of positions, so the
float64 work of temperature sampling never holds more than `CHUNK_ELEMENTS` entries at once whatever the
vocabulary and the number of masked positions (a 50k vocabulary x 4096 positions would otherwise be three
1.6 GB float64/float32 copies), and it computes confidences from a log-sum-exp instead of a full softmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Positions x vocabulary entries handled at once by `decide`: 4M entries = 32 MB per float64 buffer.
CHUNK_ELEMENTS = 1 << 22


def fixed_step_schedule(masks: int, steps: int) -> list[int]:
    """Commits per step for a block with `masks` masks and `steps` steps (the reference schedule)."""
    base, extra = divmod(masks, steps)
    return [base + (i < extra) for i in range(steps)]


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k and outside the nucleus of mass top_p to -inf (the best always stays)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_candidates(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                      noise: torch.Tensor | None) -> torch.Tensor:
    """x̂ = argmax(filtered logits / T + Gumbel) with float64 Gumbel noise from uniforms `noise`;
    T = 0 is the plain argmax (filters cannot change it)."""
    if temperature == 0:
        return logits.argmax(-1)
    scaled = filter_logits(logits.double() / temperature, top_k, top_p)
    gumbel = -torch.log(-torch.log(noise))
    return (scaled + gumbel).argmax(-1)


def confidences(probs: torch.Tensor, candidates: torch.Tensor, strategy: str,
                uniform: torch.Tensor | None) -> torch.Tensor:
    """Per-position confidence (higher commits first) for a strategy."""
    if strategy == "low_confidence":
        return probs.gather(-1, candidates[:, None]).squeeze(-1)
    if strategy == "margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    if strategy == "entropy":
        return torch.exp(-entropy(probs))
    return uniform.to(probs.dtype)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    return torch.special.entr(probs).sum(-1)


def commit_mask(select: torch.Tensor, score: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The `counts[b]` selected positions of each row with the highest `score` ([B, L], -inf where unselected)."""
    order = score.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                             .expand_as(order).contiguous())
    return select & (rank < counts[:, None])


@dataclass
class Decisions:
    """One step's per-position outcome, in the row-major order of the logits."""

    candidates: torch.Tensor        # [N] long: x̂
    confidence: torch.Tensor        # [N] float32: the strategy's score (higher commits first)
    entropy: torch.Tensor | None    # [N] float32 entropy of softmax(logits), when asked for


def decide(logits: torch.Tensor, temperature: float, strategy: str, segments: Sequence[tuple[int, torch.Generator]],
           top_k: int | None = None, top_p: float | None = None, need_entropy: bool = False,
           chunk_elements: int | None = None) -> Decisions:
    """Candidates and confidences for [N, V] logits whose rows belong to consecutive `segments`.

    `segments` lists (number of positions, generator) per canvas row, in order. Randomness is drawn from
    each row's generator in row order and position order (Gumbel noise [n, V] at T > 0, then one uniform
    per position for `random`), exactly as one `torch.rand((n, V))` per row would: a CPU generator gives
    the same numbers whether a row's draws are split into chunks or not, so chunking changes no token.

    Where float64 matters: the Gumbel noise -log(-log u) and the scaled logits it is added to. With
    float32 uniforms (steps of 2^-24) the largest Gumbel value is about 16.6 and its tail is cut off, so
    unlikely tokens are under-sampled and near-equal scores tie; float64 (steps of 2^-53) keeps the
    Gumbel-max draw an exact sample of softmax(filtered logits / T) to far below any observable level.
    Confidences need no float64: `low_confidence` is exp(logit[x̂] - logsumexp(logits)) in float32, i.e.
    softmax(logits)[x̂] without materialising the softmax; `margin` uses the two largest logits; only
    `entropy` (strategy or bound) forms a softmax, one chunk at a time.
    """
    n, vocab = logits.shape
    size = max(1, (chunk_elements or CHUNK_ELEMENTS) // max(vocab, 1))
    device = logits.device
    candidates = torch.empty(n, dtype=torch.long, device=device)
    confidence = torch.empty(n, dtype=torch.float32, device=device)
    ent = torch.empty(n, dtype=torch.float32, device=device) if need_entropy or strategy == "entropy" else None
    # With randomness a chunk never spans two rows (each row draws from its own generator).
    if temperature > 0:
        bounds, start = [], 0
        for count, gen in segments:
            bounds += [(s, min(s + size, start + count), gen) for s in range(start, start + count, size)]
            start += count
    else:
        bounds = [(s, min(s + size, n), None) for s in range(0, n, size)]
    for s, e, gen in bounds:
        chunk = logits[s:e].float()  # a no-op for float32 logits; bf16 -> f32 per chunk only
        if temperature > 0:
            scaled = filter_logits(chunk.double() / temperature, top_k, top_p)
            gumbel = torch.rand(scaled.shape, generator=gen, dtype=torch.float64, device=device)
            gumbel.log_().neg_().log_().neg_()
            candidates[s:e] = scaled.add_(gumbel).argmax(-1)
            del scaled, gumbel
        else:
            candidates[s:e] = chunk.argmax(-1)
        if strategy in ("low_confidence", "margin"):
            lse = torch.logsumexp(chunk, -1)
            if strategy == "low_confidence":
                confidence[s:e] = (chunk.gather(-1, candidates[s:e, None]).squeeze(-1) - lse).exp()
            else:
                top2 = torch.topk(chunk, 2, dim=-1).values
                confidence[s:e] = (top2[:, 0] - lse).exp() - (top2[:, 1] - lse).exp()
        if ent is not None:
            ent[s:e] = entropy(torch.softmax(chunk, -1))
            if strategy == "entropy":
                confidence[s:e] = torch.exp(-ent[s:e])
    if strategy == "random":
        confidence = torch.cat([torch.rand(count, generator=gen, device=device) for count, gen in segments])
    return Decisions(candidates, confidence, ent)
