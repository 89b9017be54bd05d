"""The masked-diffusion objective: forward process, time sampling, loss weights, ELBO (DESIGN §4).

Every training and likelihood formula of the project lives here:

  * forward process   p = (1 - eps) * t + eps; each maskable token -> [MASK] with probability p
  * time sampling     one t per sequence, antithetic over the (global) batch: t_i = (u + i / N) mod 1
  * training loss     mean_b [ sum_{i masked} CE(b, i) / p_b ] / n_b,   n_b = number of maskable tokens
                      (pretraining: every token is maskable, so this is the B*L normalisation of §4;
                       SFT: maskable = answer incl. EOS padding, so this is the per-sample answer-length one)
  * likelihood        -log p(x0) <= E_l (n / l) sum_{i in S_l} CE(i),  l ~ U{1..n}, S_l = l uniform positions

The training loss, evaluated with fixed-seed noise (`diffusion_loss` with a seeded generator), is an
unbiased estimate of the per-token ELBO; `likelihood_nll(...) / n` estimates the same quantity with
lower variance, so evaluate.py and the Trainer's eval loss agree up to Monte-Carlo noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dlm.modeling import selected_logits

EPS = 1e-3


def mask_probability(t: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Probability that a maskable token is masked at noise level t (linear schedule, floored at eps)."""
    return (1.0 - eps) * t + eps


def antithetic_times(count: int, generator: torch.Generator, offset: int = 0, total: int | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Noise levels t_i = (u + i / total) mod 1 for i in [offset, offset + count): one shared uniform u.

    `offset`/`total` let each data-parallel rank take its slice of one global antithetic batch, so
    the strata cover the whole global batch instead of repeating on every rank.
    """
    total = count if total is None else total
    u = torch.rand((), generator=generator, device=generator.device)
    i = torch.arange(offset, offset + count, device=generator.device, dtype=torch.float32)
    return torch.remainder(u + i / total, 1.0).to(device or generator.device)


def sample_mask(maskable: torch.Tensor, p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x_0): mask each maskable position where `noise` [B, L] (uniform) < p_b."""
    return maskable & (noise < p[:, None])


def masked_token_ce(model: torch.nn.Module, input_ids: torch.Tensor, masked: torch.Tensor, mask_id: int,
                    attention_mask: torch.Tensor | None = None, sparse: bool = True) -> torch.Tensor:
    """Cross-entropy (float32, nats) of x0 at each masked position of x_t, as [N] in row-major order.

    The MLM head runs only on the masked rows (`selected_logits`), which is where all the loss is.
    """
    noisy = torch.where(masked, torch.as_tensor(mask_id, device=input_ids.device), input_ids)
    logits = selected_logits(model, noisy, masked, attention_mask=attention_mask, sparse=sparse)
    return F.cross_entropy(logits.float(), input_ids[masked], reduction="none")


def per_sequence_sum(values: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Sum the [N] values of the selected positions of each row of `selected` [B, L] -> [B]."""
    rows = selected.nonzero(as_tuple=True)[0]
    return torch.zeros(selected.shape[0], dtype=values.dtype, device=values.device).index_add(0, rows, values)


def diffusion_loss(model: torch.nn.Module, input_ids: torch.Tensor, maskable: torch.Tensor, mask_id: int,
                   t: torch.Tensor, noise: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   sparse: bool = True, eps: float = EPS, reduction: str = "mean") -> torch.Tensor:
    """The masked-diffusion training loss of one batch (DESIGN §4), a scalar (`reduction="none"`: [B] per row).

    loss = mean_b [ sum_{i masked} CE(b, i) / p_b ] / n_b with n_b = maskable tokens of row b.
    `t` [B] are the noise levels and `noise` [B, L] the uniforms of the forward process, so the
    caller decides where randomness comes from (seeded per step for exact resume / fixed for eval).
    """
    p = mask_probability(t.to(torch.float32), eps)
    masked = sample_mask(maskable, p.to(noise.dtype), noise)
    ce = masked_token_ce(model, input_ids, masked, mask_id, attention_mask, sparse)
    weighted = per_sequence_sum(ce, masked) / p.to(ce.device)
    n = maskable.sum(1).clamp(min=1).to(ce.dtype)
    per_row = weighted / n
    return per_row if reduction == "none" else per_row.mean()


def row_generator(seed: int, row: int) -> torch.Generator:
    """A CPU generator that is a fixed function of (seed, row index): evaluation noise that belongs to the
    row, not to the batch or the process it lands in (splitmix64 of the pair)."""
    x = (seed * 0x9E3779B97F4A7C15 + row + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return torch.Generator().manual_seed((x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF)


def row_uniforms(generators: Sequence[torch.Generator], lengths: Sequence[int], width: int) -> torch.Tensor:
    """[B, width] uniforms, row b drawn from `generators[b]` for its own `lengths[b]` positions only (the
    rest is 2.0, above any threshold): how many numbers a row consumes never depends on its batch."""
    out = torch.full((len(generators), width), 2.0)
    for b, (gen, n) in enumerate(zip(generators, lengths)):
        out[b, :n] = torch.rand(n, generator=gen)
    return out


def row_elbo_losses(model: torch.nn.Module, input_ids: torch.Tensor, maskable: torch.Tensor, mask_id: int,
                    rows: Sequence[int], total: int, seed: int, padding: torch.Tensor | None = None,
                    sparse: bool = True, eps: float = EPS) -> torch.Tensor:
    """The Trainer's eval loss per row [B]: `diffusion_loss` with noise that belongs to each row.

    Row r (its index in an eval set of `total` rows) takes t_r = (u + r / total) mod 1, one antithetic set
    over the whole eval set (u from `seed`), and its mask noise from `row_generator(seed, r)`. `padding`
    [B, L] (batch padding) is neither attended nor scored. So a row's value does not depend on the rows
    it is batched with, nor on the process that evaluates it.
    """
    b, width = input_ids.shape
    u = torch.rand((), generator=row_generator(seed, -1))
    t = torch.remainder(u + torch.tensor(rows, dtype=torch.float32) / total, 1.0)
    attention = None if padding is None else (~padding).long()
    lengths = [width] * b if attention is None else attention.sum(1).tolist()
    noise = row_uniforms([row_generator(seed, r) for r in rows], lengths, width)
    if padding is not None:
        maskable = maskable & ~padding
    return diffusion_loss(model, input_ids, maskable, mask_id, t.to(input_ids.device), noise.to(input_ids.device),
                          attention, sparse, eps, reduction="none")


def elbo_loss(model: torch.nn.Module, input_ids: torch.Tensor, maskable: torch.Tensor, mask_id: int,
              generator: torch.Generator, attention_mask: torch.Tensor | None = None, sparse: bool = True,
              eps: float = EPS) -> torch.Tensor:
    """The evaluation loss: `diffusion_loss` with antithetic times and noise drawn from `generator`.

    The Trainer's eval loop calls this with a generator seeded per eval batch, so successive
    evaluations see the same noise and are comparable; evaluate.py can call it with the same seed.
    """
    b, length = input_ids.shape
    t = antithetic_times(b, generator)
    noise = torch.rand((b, length), generator=generator, device=generator.device)
    return diffusion_loss(model, input_ids, maskable, mask_id, t.to(input_ids.device), noise.to(input_ids.device),
                          attention_mask, sparse, eps)


@torch.no_grad()
def likelihood_nll(model: torch.nn.Module, input_ids: torch.Tensor, maskable: torch.Tensor, mask_id: int,
                   num_samples: int, generator: torch.Generator | Sequence[torch.Generator], sparse: bool = True,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Monte-Carlo upper bound on -log p(maskable part of x0) in nats per sequence, [B] (DESIGN §4).

    Draw k = 0..K-1: l_k = floor(((u + k / K) mod 1) * n) + 1 (stratified over U{1..n}, one u per
    sequence), mask exactly l_k of the n maskable tokens uniformly at random, score (n / l_k) * sum CE.
    When K is a multiple of n every l appears exactly K / n times and only the choice of positions
    is random. Non-maskable tokens (the prompt) are always visible. One forward pass per draw.
    With one generator per row (a sequence), each row's draws come from its own generator over its
    own attended positions, so a row's estimate does not depend on the batch it is in.
    """
    b, length = input_ids.shape
    device = input_ids.device
    n = maskable.sum(1)
    if bool((n == 0).any()):
        raise ValueError("likelihood_nll: a sequence has no maskable tokens")
    if isinstance(generator, torch.Generator):
        def uniforms(width: int) -> torch.Tensor:
            return torch.rand((b, width), generator=generator, device=generator.device).to(device)
    else:
        lengths = (attention_mask.sum(1) if attention_mask is not None else torch.full((b,), length)).tolist()

        def uniforms(width: int) -> torch.Tensor:
            return row_uniforms(generator, [min(n_, width) for n_ in lengths], width).to(device)
    u = uniforms(1)[:, 0]
    total = torch.zeros(b, dtype=torch.float64, device=device)
    for k in range(num_samples):
        frac = torch.remainder(u + k / num_samples, 1.0)
        l = (frac * n).floor().long().clamp(max=n - 1) + 1  # noqa: E741  (l as in DESIGN §4)
        # exactly l positions: the l smallest random scores among the maskable positions
        scores = uniforms(length).masked_fill(~maskable, 2.0)
        rank = scores.argsort(1).argsort(1)
        masked = rank < l[:, None]
        ce = masked_token_ce(model, input_ids, masked, mask_id, attention_mask, sparse)
        total += (per_sequence_sum(ce, masked) * n / l).double()
    return (total / num_samples).float()
