"""Per-position decisions of one denoising step: the candidate token, its confidence, and which positions commit.

DESIGN §4 "Sampling": x̂ = argmax(logits / T + Gumbel) (T = 0 is argmax), a confidence per strategy, and the
commit rules (the reference fixed-step schedule, highest-score-first selection).
"""

from __future__ import annotations

import torch


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
