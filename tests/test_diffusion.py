"""The masked-diffusion objective of DESIGN §4: forward process, time sampling, losses, likelihood."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import dlm.diffusion
from dlm.diffusion import (EPS, IGNORE_INDEX, antithetic_times, diffusion_loss, elbo_loss, likelihood_nll,
                           mask_probability, sample_mask, token_cross_entropy)
from dlm.modeling import ROW_BUCKETS, padded_row_count, selected_rows


@pytest.fixture(scope="module")
def model(tokenizer):
    from dlm.modeling import build_from_scratch

    torch.manual_seed(0)
    m = build_from_scratch("tiny", tokenizer, max_position_embeddings=64, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2)
    # A random init predicts almost uniformly; a larger output scale makes CE position-dependent,
    # so the tests below would catch a mis-weighted or mis-normalised term.
    with torch.no_grad():
        m.model.embeddings.tok_embeddings.weight.mul_(30)
    return m.eval()


def test_mask_rate_matches_schedule():
    gen = torch.Generator().manual_seed(0)
    maskable = torch.ones(1, 200_000, dtype=torch.bool)
    for t in (0.0, 0.1, 0.5, 0.9, 1.0):
        p = mask_probability(torch.tensor([t]))
        assert p.item() == pytest.approx((1 - EPS) * t + EPS)
        rate = sample_mask(maskable, p, torch.rand(1, 200_000, generator=gen)).float().mean().item()
        assert rate == pytest.approx(p.item(), abs=4 * (p.item() * (1 - p.item()) / 200_000) ** 0.5 + 1e-6)


def test_antithetic_times_cover_unit_interval_evenly():
    gen = torch.Generator().manual_seed(3)
    t = antithetic_times(16, gen)
    assert ((t >= 0) & (t < 1)).all()
    gaps = torch.diff(torch.sort(t).values)
    assert torch.allclose(gaps, torch.full_like(gaps, 1 / 16), atol=1e-6)  # one t per stratum [k/16, (k+1)/16)
    assert sorted((t * 16).floor().long().tolist()) == list(range(16))
    # Two ranks taking their slices of one global batch get exactly the single-process times.
    full = antithetic_times(8, torch.Generator().manual_seed(5))
    parts = [antithetic_times(4, torch.Generator().manual_seed(5), offset=r * 4, total=8) for r in range(2)]
    assert torch.equal(torch.cat(parts), full)


def test_prompt_never_masked():
    maskable = torch.zeros(4, 50, dtype=torch.bool)
    maskable[:, 20:] = True  # prompt = first 20 tokens
    masked = sample_mask(maskable, torch.ones(4), torch.rand(4, 50))  # p = 1: every maskable token
    assert not masked[:, :20].any() and masked[:, 20:].all()


def test_loss_normalisation_by_hand(model, tokenizer):
    """mean_b [sum_{masked} CE / p_b] / n_b, recomputed from full logits with explicit loops."""
    torch.manual_seed(1)
    ids = torch.randint(20, 500, (3, 12))
    maskable = torch.ones(3, 12, dtype=torch.bool)
    maskable[1, :5] = False  # an SFT-like row: 5 prompt tokens, 7 answer tokens
    maskable[2, :9] = False
    t = torch.tensor([0.3, 0.6, 0.95])
    noise = torch.rand(3, 12)
    mask_id = tokenizer.mask_token_id
    loss = diffusion_loss(model, ids, maskable, mask_id, t, noise)

    expected = 0.0
    for b in range(3):
        p = (1 - EPS) * t[b].item() + EPS
        masked = [i for i in range(12) if maskable[b, i] and noise[b, i] < p]
        noisy = ids[b].clone()
        noisy[masked] = mask_id
        with torch.no_grad():
            logits = model(input_ids=noisy[None]).logits[0]
        row = sum(F.cross_entropy(logits[i], ids[b, i]).item() for i in masked) / p
        expected += row / int(maskable[b].sum())
    expected /= 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # pretraining rows (all maskable) reduce to the B*L normalisation of DESIGN §4
    full = torch.ones_like(maskable)
    per_token = diffusion_loss(model, ids, full, mask_id, t, noise)
    p = mask_probability(t)
    masked = noise < p[:, None]
    noisy = torch.where(masked, mask_id, ids)
    with torch.no_grad():
        ce = F.cross_entropy(model(input_ids=noisy).logits.transpose(1, 2), ids, reduction="none")
    assert per_token.item() == pytest.approx(((ce * masked / p[:, None]).sum() / (3 * 12)).item(), rel=1e-5)


def loss_and_grads(model, *args, **kwargs) -> tuple[float, dict[str, torch.Tensor]]:
    """`diffusion_loss(model, *args, **kwargs)` and every parameter's gradient (the model's grads are left clean)."""
    model.zero_grad()
    loss = diffusion_loss(model, *args, **kwargs)
    loss.backward()
    grads = {k: v.grad.clone() for k, v in model.named_parameters() if v.grad is not None}
    model.zero_grad()
    return loss.item(), grads


def test_sparse_head_gives_same_loss_and_gradients(model, tokenizer):
    torch.manual_seed(2)
    ids = torch.randint(20, 500, (4, 16))
    maskable = torch.rand(4, 16) > 0.3
    t, noise = torch.rand(4), torch.rand(4, 16)
    (loss_a, grads_a), (loss_b, grads_b) = (loss_and_grads(model, ids, maskable, tokenizer.mask_token_id, t, noise,
                                                          sparse=sparse) for sparse in (True, False))
    key = "model.embeddings.tok_embeddings.weight"
    assert loss_a == pytest.approx(loss_b, abs=1e-5)
    assert torch.allclose(grads_a[key], grads_b[key], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_cross_entropy_matches_torch(dtype, monkeypatch):
    """Chunked CE: F.cross_entropy's values and gradients, ignored rows 0 with no gradient."""
    monkeypatch.setattr(dlm.diffusion, "_CE_CHUNK_ELEMENTS", 7 * 300)  # 7 rows per chunk: several chunks
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 300, generator=g) * 4).to(dtype)
    target = torch.randint(0, 300, (37,), generator=g)
    target[[3, 20, 36]] = IGNORE_INDEX
    upstream = torch.rand(37, generator=g)
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = token_cross_entropy(ours_in, target)
    ref = F.cross_entropy(ref_in.float(), target, reduction="none", ignore_index=IGNORE_INDEX)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert ours.dtype == torch.float32 and ours_in.grad.dtype == dtype
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, **tol)
    assert (ours[[3, 20, 36]] == 0).all() and (ours_in.grad[[3, 20, 36]] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("last_op", ["linear", "tanh"])
def test_owned_logits_get_the_same_gradients_whether_or_not_overwritten(dtype, last_op, monkeypatch):
    """`owned=True` writes the gradient into the logits' storage only when the op that made them kept no copy.

    A linear layer's output is overwritten (no new [N, V] buffer); a tanh's output is saved by tanh's own
    backward, so it must be left alone. Either way every upstream gradient equals F.cross_entropy's.
    """
    monkeypatch.setattr(dlm.diffusion, "_CE_CHUNK_ELEMENTS", 7 * 300)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(37, 16, generator=g)
    weight = (torch.randn(300, 16, generator=g) * 0.5).to(dtype)
    bias = torch.randn(300, generator=g).to(dtype)
    target = torch.randint(0, 300, (37,), generator=g)
    target[[0, 36]] = IGNORE_INDEX
    upstream = torch.rand(37, generator=g)
    results = []
    for ours in (True, False):
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        logits = F.linear(hidden.to(dtype), w, b)
        if last_op == "tanh":
            logits = torch.tanh(logits)
        storage = logits.untyped_storage().data_ptr()
        if ours:
            ce = token_cross_entropy(logits, target, owned=True)
        else:
            ce = F.cross_entropy(logits.float(), target, reduction="none", ignore_index=IGNORE_INDEX)
        before = logits.detach().clone()
        (ce * upstream).sum().backward()
        overwritten = not torch.equal(logits.detach(), before)
        results.append((ce.detach(), w.grad, b.grad, overwritten))
        assert logits.untyped_storage().data_ptr() == storage
    (ours_ce, ours_w, ours_b, overwritten), (ref_ce, ref_w, ref_b, _) = results
    assert overwritten == (last_op == "linear")
    torch.testing.assert_close(ours_ce, ref_ce.float(), atol=1e-5, rtol=1e-5)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ours_w, ref_w, **tol)
    torch.testing.assert_close(ours_b, ref_b, **tol)


def test_static_shapes_same_loss_and_gradient(model, tokenizer):
    """Padding the masked rows up to a bucket changes neither the loss nor any parameter's gradient."""
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(20, 500, (4, 24), generator=g)
    maskable = torch.rand(4, 24, generator=g) > 0.2
    t, noise = torch.rand(4, generator=g), torch.rand(4, 24, generator=g)
    p = mask_probability(t)
    masked = sample_mask(maskable, p, noise)
    index, n = selected_rows(masked, static=True)
    assert n == int(masked.sum()) and index.numel() == padded_row_count(n, masked.numel()) > n  # padding in play
    losses, grads = zip(*(loss_and_grads(model, ids, maskable, tokenizer.mask_token_id, t, noise, static_shapes=static)
                          for static in (True, False)))
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5, msg=k)


def test_padded_row_counts_take_few_values():
    """Every masked-row count of a [8, 512] batch maps to one of at most ROW_BUCKETS sizes, never below n."""
    total = 8 * 512
    sizes = {padded_row_count(n, total) for n in range(total + 1)}
    assert len(sizes) <= ROW_BUCKETS and max(sizes) == total
    assert all(n <= padded_row_count(n, total) <= n + total // ROW_BUCKETS for n in range(1, total + 1))


def exact_elbo(model, ids: torch.Tensor, maskable: torch.Tensor, mask_id: int) -> float:
    """sum_l (1/l) * mean_{|S|=l} sum_{i in S} CE_i(x with S masked): the expectation of both estimators."""
    positions = maskable.nonzero().flatten().tolist()
    n = len(positions)
    total = 0.0
    for l in range(1, n + 1):  # noqa: E741
        subsets = list(itertools.combinations(positions, l))
        acc = 0.0
        for subset in subsets:
            noisy = ids.clone()
            noisy[list(subset)] = mask_id
            with torch.no_grad():
                logits = model(input_ids=noisy[None]).logits[0]
            acc += sum(F.cross_entropy(logits[i], ids[i]).item() for i in subset)
        total += acc / len(subsets) / l
    return total


def test_likelihood_estimator_is_unbiased_against_exact_enumeration(model, tokenizer):
    torch.manual_seed(4)
    ids = torch.randint(20, 500, (2, 5))
    maskable = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)  # n = 3 each, prompt visible
    mask_id = tokenizer.mask_token_id
    exact = torch.tensor([exact_elbo(model, ids[b], maskable[b], mask_id) for b in range(2)])
    est = likelihood_nll(model, ids, maskable, mask_id, num_samples=300, generator=torch.Generator().manual_seed(0))
    assert est.shape == (2,)
    assert torch.allclose(est, exact, rtol=0.03), (est, exact)
    # With num_samples a multiple of n every l is used equally often: with n = 1 the estimator is exact.
    one = torch.tensor([[0, 0, 1, 0, 0]], dtype=torch.bool)
    est1 = likelihood_nll(model, ids[:1], one, mask_id, num_samples=2, generator=torch.Generator().manual_seed(1))
    assert est1.item() == pytest.approx(exact_elbo(model, ids[0], one[0], mask_id), rel=1e-5)


def test_training_eval_loss_agrees_with_likelihood(model, tokenizer):
    """The Trainer's eval loss (per-token, 1/p-weighted) and likelihood_nll / n estimate the same ELBO."""
    torch.manual_seed(5)
    ids = torch.randint(20, 500, (1, 4)).repeat(128, 1)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    mask_id = tokenizer.mask_token_id
    exact = exact_elbo(model, ids[0], maskable[0], mask_id) / 4
    with torch.no_grad():
        train_est = torch.stack([elbo_loss(model, ids, maskable, mask_id, torch.Generator().manual_seed(s))
                                 for s in range(40)]).mean().item()
    like = likelihood_nll(model, ids[:1], maskable[:1], mask_id, 400, torch.Generator().manual_seed(0)).item() / 4
    assert like == pytest.approx(exact, rel=0.03)
    assert train_est == pytest.approx(exact, rel=0.05)
    # a fixed generator seed gives the same eval loss every time (comparable successive evaluations)
    with torch.no_grad():
        a = elbo_loss(model, ids, maskable, mask_id, torch.Generator().manual_seed(9))
        b = elbo_loss(model, ids, maskable, mask_id, torch.Generator().manual_seed(9))
    assert a.item() == b.item()


def test_compiled_model_gives_the_eager_loss_with_the_sparse_head(tokenizer):
    """torch.compile (as the Trainer's --torch_compile applies it) traces the sparse-head hook without graph breaks.

    backend="eager" runs dynamo's tracing (where hooks and data-dependent shapes would break the graph) without
    inductor's C++ build, which takes minutes on CPU; `benchmarks/bench_train.py --mode run --variants
    dlm+compile` runs inductor and compares its losses with the eager run's.
    """
    import torch._dynamo
    from torch._dynamo.utils import counters

    from dlm.modeling import build_from_scratch

    torch.manual_seed(0)
    model = build_from_scratch("tiny", tokenizer, max_position_embeddings=64, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=2).train()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    g = torch.Generator().manual_seed(8)
    for _ in range(2):  # two mask draws: two different masked-row counts
        ids = torch.randint(20, 500, (4, 32), generator=g)
        maskable = torch.ones_like(ids, dtype=torch.bool)
        t, noise = torch.rand(4, generator=g), torch.rand(4, 32, generator=g)
        losses, grads = [], []
        for m in (compiled, model):
            model.zero_grad()
            loss = diffusion_loss(m, ids, maskable, tokenizer.mask_token_id, t, noise)
            loss.backward()
            losses.append(loss.item())
            grads.append(model.model.embeddings.tok_embeddings.weight.grad.clone())
        assert losses[0] == pytest.approx(losses[1], abs=1e-6)
        torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1
    torch._dynamo.reset()
