"""Per-position decisions of one denoising step: the candidate token, its confidence, and which positions commit.

DESIGN §4 "Sampling": x̂ ~ softmax(logits / T), the distribution of argmax(logits / T + Gumbel) (T = 0 is
argmax), a confidence per strategy, and the commit rules (the reference fixed-step schedule,
highest-score-first selection).

`decide` is what a sampler step calls: it works through the [N, V] logits in chunks of positions, so the
float64 work of temperature sampling never holds more than `CHUNK_ELEMENTS` entries at once whatever the
vocabulary and the number of masked positions (a 50k vocabulary x 4096 positions would otherwise be several
0.8-1.6 GB float32/float64 copies), and it computes confidences from a log-sum-exp instead of a softmax.
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

    T = 0: x̂ = argmax(logits). T > 0: x̂ is drawn from softmax(filtered logits / T) (top-k, then top-p of
    the tempered distribution), the distribution DESIGN §4 writes as argmax(logits / T + Gumbel). It is
    drawn by inverting the cumulative distribution with one uniform per position (a segment of the
    vocabulary by the segments' masses, then the token inside it): the same distribution as Gumbel-max
    from V times fewer random numbers and a third of the passes over [n, V] (a Gumbel needs a uniform
    and two logarithms per vocabulary entry, and float64 copies to hold them).

    Where float64 matters, and why: the sums of the weights and the uniform. A float32 running sum over
    a 50k vocabulary has a relative step of 6e-8, so every token below that share of the mass summed
    before it would lose its interval (up to ~3e-3 of the total mass at 50k), and a float32 uniform has
    steps of 2^-24, which cuts off the tail as float32 Gumbel noise does; in float64 both are below 1e-12.
    The weights exp(logit / T - max / T) themselves are float32 (no [n, V] float64 copy): their rounding
    is that of logits within 2 float32 ulps of the given ones, far below the model's own float32 noise.
    With top-k/top-p the filtered, scaled logits are float64 (the filter sorts them anyway).

    Randomness comes from each row's generator (`segments`: (positions, generator) per canvas row, in
    order): one float64 uniform per position in position order, then for `random` one float32 uniform per
    position. A CPU generator yields the same numbers whether a row's draws are split into chunks or not,
    so chunking changes no token. Confidences need no float64: `low_confidence` is
    exp(logit[x̂] - logsumexp(logits)), i.e. softmax(logits)[x̂] without a softmax; `margin` uses the two
    largest logits; only `entropy` (strategy or bound) forms a softmax, one chunk at a time.
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
        chunk = logits[s:e].float()  # a no-op for float32 logits; bf16 -> f32 one chunk at a time
        top, best = chunk.max(-1)     # one pass: the argmax and the shift for stable exponentials
        if temperature > 0:
            candidates[s:e] = _sample(chunk, top, temperature, top_k, top_p, gen)
        else:
            candidates[s:e] = best
        if strategy in ("low_confidence", "margin"):
            lse = top + (chunk - top[:, None]).exp_().sum(-1).log_()
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


def _sample(chunk: torch.Tensor, top: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
            generator: torch.Generator) -> torch.Tensor:
    """One draw per row of softmax(filtered chunk / T): a float64 uniform picks one of (up to 64) equal
    segments of the vocabulary by their float64 masses, then a token inside it by its float64 running sum."""
    rows, vocab = chunk.shape
    if top_k is not None or top_p is not None:
        scaled = filter_logits(chunk.double() / temperature, top_k, top_p)
        weights = scaled.sub_(scaled.max(-1, keepdim=True).values).exp_()
    else:  # exp(logit / T - max / T): one float32 pass and an in-place exp, no float64 copy of [rows, V]
        weights = torch.add(top[:, None] / -temperature, chunk, alpha=1 / temperature).exp_()
    parts = max(d for d in range(1, 65) if vocab % d == 0)  # 64 for 50,368; long contiguous sums are fast
    segments = weights.view(rows, parts, vocab // parts)
    mass = segments.sum(-1, dtype=torch.float64)                      # [rows, parts]
    upto = mass.cumsum(-1)
    u = torch.rand((rows, 1), generator=generator, dtype=torch.float64, device=chunk.device)
    # Token i is drawn when (mass of the tokens before i) <= u * total < (that + weight_i): probability
    # weight_i / total. Each `nextafter` keeps a rounded-up target below its sum, so a zero weight is never hit.
    total = upto[:, -1:]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    j = torch.searchsorted(upto, target, right=True)                 # [rows, 1] the segment
    inside = segments.gather(1, j[:, :, None].expand(-1, -1, segments.shape[2])).squeeze(1).double().cumsum(-1)
    rest = (target - (upto.gather(1, j) - mass.gather(1, j))).clamp(min=0)
    rest = torch.minimum(rest, torch.nextafter(inside[:, -1:], torch.zeros_like(rest)))
    return (j * segments.shape[2] + torch.searchsorted(inside, rest, right=True)).squeeze(-1)
