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

from dlm.modeling import selected_logits, selected_rows

EPS = 1e-3
IGNORE_INDEX = -100
# Logits per chunk in `token_cross_entropy` (16 MB of float32): float32 temporaries exist for one chunk,
# never for the whole [N, V]. Below glibc's largest mmap threshold (32 MB), so on CPU a chunk's temporaries
# reuse heap blocks instead of being mapped and page-faulted anew each time (64 MB chunks were 5-10% slower
# at N = 2048, V = 16,384); much smaller chunks pay per-op overhead instead.
_CE_CHUNK_ELEMENTS = 1 << 22
# Autograd nodes that keep their inputs, never their output, for backward: logits made by one of these (and
# not a view) may be overwritten by their own gradient, which saves an [N, V] buffer and a pass over it.
_OUTPUT_NOT_SAVED = frozenset({"AddmmBackward0", "MmBackward0", "AddBackward0", "IndexSelectBackward0"})


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


class _TokenCrossEntropy(torch.autograd.Function):
    """Cross-entropy per row that keeps only the logits and one float32 log-sum-exp per row for backward.

    F.cross_entropy saves a full [N, V] log-softmax (plus, for bf16 logits, a float32 copy made first) and
    builds two more [N, V] tensors in backward; here the forward reads the logits chunk by chunk and the
    backward writes the gradient once: softmax(logits) - onehot(target), scaled per row. With `overwrite`
    the gradient is written into the logits' own storage, which nothing reads after this backward.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, overwrite: bool) -> torch.Tensor:
        valid = target != IGNORE_INDEX
        safe = torch.where(valid, target, 0)
        chunk = max(1, _CE_CHUNK_ELEMENTS // max(1, logits.shape[1]))
        ce = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(ce)
        for s in range(0, logits.shape[0], chunk):
            rows = logits[s:s + chunk].float()
            log_probs = torch.log_softmax(rows, dim=-1)  # a temporary of one chunk, not kept for backward
            ce[s:s + chunk] = -log_probs.gather(1, safe[s:s + chunk, None]).squeeze(1)
            lse[s:s + chunk] = rows[:, 0] - log_probs[:, 0]
        ctx.save_for_backward(logits, safe, valid, lse)
        ctx.overwrite = overwrite
        return torch.where(valid, ce, 0.0)

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, safe, valid, lse = ctx.saved_tensors
        scale = torch.where(valid, grad_ce.float(), 0.0)
        grad = logits if ctx.overwrite else torch.empty_like(logits)
        chunk = max(1, _CE_CHUNK_ELEMENTS // max(1, logits.shape[1]))
        rows = torch.arange(logits.shape[0], device=logits.device)
        for s in range(0, logits.shape[0], chunk):
            e = min(s + chunk, logits.shape[0])
            if logits.dtype == torch.float32:  # write the softmax straight into the gradient buffer
                g = torch.sub(logits[s:e], lse[s:e, None], out=grad[s:e])
            else:
                g = logits[s:e].float() - lse[s:e, None]
            g.exp_()
            g[rows[: e - s], safe[s:e]] -= 1.0
            g.mul_(scale[s:e, None])
            if g.data_ptr() != grad[s:e].data_ptr():
                grad[s:e] = g
        return grad, None, None


def token_cross_entropy(logits: torch.Tensor, target: torch.Tensor, owned: bool = False) -> torch.Tensor:
    """Cross-entropy in float32 nats of each row of `logits` [N, V] (any float dtype) against `target` [N].

    Rows whose target is IGNORE_INDEX give 0 and receive no gradient. Same values and gradients as
    `F.cross_entropy(logits.float(), target, reduction="none", ignore_index=IGNORE_INDEX)` without its
    full-size float32 copy and log-softmax; runs outside autocast (the precision is chosen here).
    `owned=True` says the caller holds the only reference to `logits` and will not read them after the
    backward: the gradient then reuses their storage, when the op that made them did not save them too
    (a linear layer's output, not a leaf or a view); otherwise a new buffer is used as always.
    """
    fn = logits.grad_fn
    overwrite = owned and fn is not None and logits._base is None and type(fn).__name__ in _OUTPUT_NOT_SAVED
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return _TokenCrossEntropy.apply(logits, target, overwrite)


def _masked_ce_rows(model: torch.nn.Module, input_ids: torch.Tensor, masked: torch.Tensor, mask_id: int,
                    attention_mask: torch.Tensor | None, sparse: bool, static: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """CE at the masked positions of x_t: (ce [R], flat positions [R], n). Rows n.. are padding with CE 0."""
    noisy = torch.where(masked, torch.as_tensor(mask_id, device=input_ids.device), input_ids)
    index, n = selected_rows(masked, static=static)
    logits = selected_logits(model, noisy, masked, attention_mask=attention_mask, sparse=sparse, index=index)
    target = input_ids.flatten().index_select(0, index)
    if index.numel() > n:  # padded rows: ignored by the loss, so they add exactly 0 and get no gradient
        target[n:] = IGNORE_INDEX
    return token_cross_entropy(logits, target, owned=True), index, n


def masked_token_ce(model: torch.nn.Module, input_ids: torch.Tensor, masked: torch.Tensor, mask_id: int,
                    attention_mask: torch.Tensor | None = None, sparse: bool = True) -> torch.Tensor:
    """Cross-entropy (float32, nats) of x0 at each masked position of x_t, as [N] in row-major order.

    The MLM head runs only on the masked rows (`selected_logits`), which is where all the loss is.
    """
    ce, _, n = _masked_ce_rows(model, input_ids, masked, mask_id, attention_mask, sparse, static=False)
    return ce[:n]


def per_sequence_sum(values: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Sum the [N] values of the selected positions of each row of `selected` [B, L] -> [B]."""
    rows = selected.nonzero(as_tuple=True)[0]
    return torch.zeros(selected.shape[0], dtype=values.dtype, device=values.device).index_add(0, rows, values)


def diffusion_loss(model: torch.nn.Module, input_ids: torch.Tensor, maskable: torch.Tensor, mask_id: int,
                   t: torch.Tensor, noise: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   sparse: bool = True, eps: float = EPS, static_shapes: bool = True,
                   reduction: str = "mean") -> torch.Tensor:
    """The masked-diffusion training loss of one batch (DESIGN §4), a scalar (`reduction="none"`: [B] per row).

    loss = mean_b [ sum_{i masked} CE(b, i) / p_b ] / n_b with n_b = maskable tokens of row b.
    `t` [B] are the noise levels and `noise` [B, L] the uniforms of the forward process, so the
    caller decides where randomness comes from (seeded per step for exact resume / fixed for eval).
    `static_shapes` pads the masked-row count up to a few bucket sizes (`padded_row_count`): the padded
    rows add exactly 0 to the loss and its gradient, and memory stays flat over a run.
    """
    p = mask_probability(t.to(torch.float32), eps)
    masked = sample_mask(maskable, p.to(noise.dtype), noise)
    ce, index, _ = _masked_ce_rows(model, input_ids, masked, mask_id, attention_mask, sparse, static_shapes)
    # Padded rows point at position 0 with CE exactly 0: summing all rows keeps every shape static.
    rows = torch.div(index, masked.shape[1], rounding_mode="floor")
    weighted = torch.zeros(masked.shape[0], dtype=ce.dtype, device=ce.device).index_add(0, rows, ce)
    weighted = weighted / p.to(ce.device)
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
                    sparse: bool = True, eps: float = EPS, attention_mask=None) -> torch.Tensor:
    """The Trainer's eval loss per row [B]: `diffusion_loss` with noise that belongs to each row.

    Row r (its index in an eval set of `total` rows) takes t_r = (u + r / total) mod 1, one antithetic set
    over the whole eval set (u from `seed`), and its mask noise from `row_generator(seed, r)`. `padding`
    [B, L] (batch padding) is neither attended nor scored. So a row's value does not depend on the rows
    it is batched with, nor on the process that evaluates it. `attention_mask` replaces the padding mask in
    the forward pass (the prompt-isolation mask of an isolated model, padding included).
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
                          attention if attention_mask is None else attention_mask, sparse, eps, reduction="none")


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
                   attention_mask: torch.Tensor | dict | None = None,
                   lengths: Sequence[int] | None = None) -> torch.Tensor:
    """Monte-Carlo upper bound on -log p(maskable part of x0) in nats per sequence, [B] (DESIGN §4).

    Draw k = 0..K-1: l_k = floor(((u + k / K) mod 1) * n) + 1 (stratified over U{1..n}, one u per
    sequence), mask exactly l_k of the n maskable tokens uniformly at random, score (n / l_k) * sum CE.
    When K is a multiple of n every l appears exactly K / n times and only the choice of positions
    is random. Non-maskable tokens (the prompt) are always visible. One forward pass per draw.
    With one generator per row (a sequence), each row's draws come from its own generator over its
    own attended positions, so a row's estimate does not depend on the batch it is in. `lengths` are those
    attended lengths; by default the sums of a [B, L] `attention_mask` (give them when the mask is another
    form, such as the prompt-isolation masks of `dlm.isolation`).
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
        if lengths is None:
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
