"""The masked-diffusion objective: forward process, time sampling, loss weights, ELBO (DESIGN §4).

Every training and likelihood formula of the project lives here:

  * forward process   p = (1 - eps) * t + eps; each maskable token -> [MASK] with probability p
  * time sampling     one t per sequence, antithetic over the (global) batch: t_i = (u + i / N) mod 1
  * training loss     mean_b [ sum_{i masked} CE(b, i) / p_b ] / n_b,   n_b = number of maskable tokens
                      (pretraining: every token is maskable, so this is the B*L normalisation of §4;
                       SFT: maskable = answer incl. EOS padding, so this is the per-sample answer-length one)
  * likelihood        -log p(x0) <= E_l (n / l) sum_{i in S_l} CE(i),  l ~ U{1..n}, S_l = l uniform positions
  * chain rule        log p(x | c) = sum_i log p(x_i | c, x_<i, [MASK] at positions >= i)   (exact, n passes)

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
                   sparse: bool = True, eps: float = EPS) -> torch.Tensor:
    """The masked-diffusion training loss of one batch (DESIGN §4), a scalar.

    loss = mean_b [ sum_{i masked} CE(b, i) / p_b ] / n_b with n_b = maskable tokens of row b.
    `t` [B] are the noise levels and `noise` [B, L] the uniforms of the forward process, so the
    caller decides where randomness comes from (seeded per step for exact resume / fixed for eval).
    """
    p = mask_probability(t.to(torch.float32), eps)
    masked = sample_mask(maskable, p.to(noise.dtype), noise)
    ce = masked_token_ce(model, input_ids, masked, mask_id, attention_mask, sparse)
    weighted = per_sequence_sum(ce, masked) / p.to(ce.device)
    n = maskable.sum(1).clamp(min=1).to(ce.dtype)
    return (weighted / n).mean()


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
                   num_samples: int, generator: torch.Generator, sparse: bool = True,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Monte-Carlo upper bound on -log p(maskable part of x0) in nats per sequence, [B] (DESIGN §4).

    Draw k = 0..K-1: l_k = floor(((u + k / K) mod 1) * n) + 1 (stratified over U{1..n}, one u per
    sequence), mask exactly l_k of the n maskable tokens uniformly at random, score (n / l_k) * sum CE.
    When K is a multiple of n every l appears exactly K / n times and only the choice of positions
    is random. Non-maskable tokens (the prompt) are always visible. One forward pass per draw.
    """
    b, length = input_ids.shape
    device = input_ids.device
    n = maskable.sum(1)
    if bool((n == 0).any()):
        raise ValueError("likelihood_nll: a sequence has no maskable tokens")
    u = torch.rand(b, generator=generator, device=generator.device).to(device)
    total = torch.zeros(b, dtype=torch.float64, device=device)
    for k in range(num_samples):
        frac = torch.remainder(u + k / num_samples, 1.0)
        l = (frac * n).floor().long().clamp(max=n - 1) + 1  # noqa: E741  (l as in DESIGN §4)
        # exactly l positions: the l smallest random scores among the maskable positions
        scores = torch.rand((b, length), generator=generator, device=generator.device).to(device)
        scores = scores.masked_fill(~maskable, 2.0)
        rank = scores.argsort(1).argsort(1)
        masked = rank < l[:, None]
        ce = masked_token_ce(model, input_ids, masked, mask_id, attention_mask, sparse)
        total += (per_sequence_sum(ce, masked) * n / l).double()
    return (total / num_samples).float()


@torch.no_grad()
def chain_rule_logprobs(model: torch.nn.Module, contexts: Sequence[Sequence[int]],
                        continuations: Sequence[Sequence[int]], mask_id: int, pad_id: int, batch_size: int = 64,
                        sparse: bool = True) -> list[tuple[torch.Tensor, bool]]:
    """Exact left-to-right log-likelihood of each continuation given its context (DESIGN §4 "Chain-rule likelihood").

    log p(x_1..x_n | c) = sum_i log p(x_i | c, x_<i, [MASK] at positions >= i): step i scores the first
    mask of the canvas c + x_<i + (n - i) masks, one forward pass per step, the context never masked.
    Canvases that coincide (continuations of one context sharing a prefix and a length, as the choices
    of a multiple-choice question do at step 0) run once; canvases are batched across requests,
    shortest first. Returns per request the n token log-probs (float64) and whether every x_i is the
    argmax of its step (left-to-right greedy decoding of n masks writes exactly this continuation).
    """
    device = next(model.parameters()).device
    # A canvas is identified by (context, continuation prefix, masks left); prefixes are numbered through a
    # trie so that keys stay O(1) in size however long the continuation.
    context_ids: dict[tuple[int, ...], int] = {}
    prefix_ids: dict[tuple[int, int], int] = {}
    canvases: dict[tuple[int, int, int], int] = {}
    first_use: list[tuple[int, int]] = []     # canvas -> (request, step) that builds it
    uses: list[tuple[int, int, int]] = []     # (canvas, request, step)
    for r, (c, x) in enumerate(zip(contexts, continuations)):
        if mask_id in c or mask_id in x:
            raise ValueError("chain_rule_logprobs: the mask token cannot be part of a context or continuation")
        prefix = -1 - context_ids.setdefault(tuple(c), len(context_ids))  # the empty prefix of this context
        for i in range(len(x)):
            key = (prefix, len(x) - i, len(c) + len(x))
            if key not in canvases:
                canvases[key] = len(first_use)
                first_use.append((r, i))
            uses.append((canvases[key], r, i))
            prefix = prefix_ids.setdefault((prefix, x[i]), len(prefix_ids))

    logprob_of: list[torch.Tensor] = [torch.empty(len(x), dtype=torch.float64) for x in continuations]
    greedy_of = [torch.ones(len(x), dtype=torch.bool) for x in continuations]
    users: dict[int, list[tuple[int, int]]] = {}
    for u, r, i in uses:
        users.setdefault(u, []).append((r, i))
    order = sorted(range(len(first_use)),
                   key=lambda u: len(contexts[first_use[u][0]]) + len(continuations[first_use[u][0]]))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        rows = []
        for u in batch:
            r, i = first_use[u]
            c, x = list(contexts[r]), list(continuations[r])
            rows.append(c + x[:i] + [mask_id] * (len(x) - i))
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        select = torch.zeros((len(rows), width), dtype=torch.bool)
        for b, (u, row) in enumerate(zip(batch, rows)):
            r, i = first_use[u]
            ids[b, :len(row)] = torch.tensor(row)
            attention[b, :len(row)] = 1
            select[b, len(contexts[r]) + i] = True
        logits = selected_logits(model, ids.to(device), select.to(device), attention_mask=attention.to(device),
                                 sparse=sparse)
        logp = torch.log_softmax(logits.double(), dim=-1).cpu()
        best = logp.argmax(-1)
        for b, u in enumerate(batch):
            for r, i in users[u]:
                token = continuations[r][i]
                logprob_of[r][i] = logp[b, token]
                greedy_of[r][i] = bool(best[b] == token)
    return [(lp, bool(g.all())) for lp, g in zip(logprob_of, greedy_of)]
