"""The sampler against an independent reference implementation, and the invariants of every commit rule."""

from __future__ import annotations

import math

import pytest
import torch

from dlm.errors import UsageError
from dlm.modeling import build_from_scratch
from dlm.policies import decide, filter_logits, fixed_step_schedule
from dlm.prompts import encode_prompt
from dlm.sampling import Denoiser, ModelDenoiser, RunningBatch, SamplerConfig, as_denoiser, generate
from dlm.tokenization import special_ids

PROMPTS = ["What is the sum of 12 and 30?", "Hi", "The king spoke to the people about bread and the sea."]


def random_model(tokenizer, seed: int = 0, init: float = 0.5):
    """A tiny random ModernBERT with diverse predictions (large init), that never predicts [MASK].

    The sampler never commits a mask token (it would leave a position undecided forever); the
    reference below is plain LLaDA, so the model itself is made to never rank [MASK] first.
    """
    torch.manual_seed(seed)
    model = build_from_scratch("tiny", tokenizer, max_position_embeddings=256, hidden_size=32,
                               intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               initializer_range=init).eval()
    with torch.no_grad():
        model.decoder.bias[tokenizer.mask_token_id] = -1e4
    return model


@pytest.fixture(scope="module")
def model(tokenizer):
    return random_model(tokenizer, seed=0)


@pytest.fixture(scope="module")
def confident_model(tokenizer):
    """Peaked distributions, so that thresholds in (0.3, 0.9) commit several positions at once."""
    return random_model(tokenizer, seed=1, init=1.0)


# ---------------------------------------------------------------------------------------------------------
# Independent reference: LLaDA's generate(), written plainly (full logits every step, one row).


def reference_num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num[i, :remainder[i]] += 1
    return num


@torch.no_grad()
def reference_generate(model, prompt: list[int], gen_length: int, steps: int, block_length: int,
                       mask_id: int, cfg_scale: float = 0.0) -> list[int]:
    prompt_t = torch.tensor([prompt])
    x = torch.full((1, len(prompt) + gen_length), mask_id, dtype=torch.long)
    x[:, :len(prompt)] = prompt_t
    prompt_index = x != mask_id
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        start = len(prompt) + num_block * block_length
        end = start + block_length
        num_transfer_tokens = reference_num_transfer_tokens(x[:, start:end] == mask_id, steps)
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                logits = model(torch.cat([x, un_x])).logits
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x).logits
            x0 = torch.argmax(logits, dim=-1)  # temperature 0: no Gumbel noise
            p = torch.softmax(logits, dim=-1)
            x0_p = torch.gather(p, dim=-1, index=x0.unsqueeze(-1)).squeeze(-1)
            x0_p[:, end:] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -math.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x[0, len(prompt):].tolist()


@pytest.mark.parametrize("gen_length,block_length,steps", [
    (16, 16, 16),   # one block, one token per step
    (16, 16, 5),    # one block, uneven schedule 4,3,3,3,3
    (24, 8, 6),     # three blocks, two steps each
    (16, 4, 16),    # four blocks
    (8, 8, 12),     # more steps than masks (zero-commit steps)
])
@pytest.mark.parametrize("model_seed", [0, 3])
def test_matches_llada_reference_at_temperature_zero(tokenizer, gen_length, block_length, steps, model_seed):
    model = random_model(tokenizer, seed=model_seed)
    cfg = SamplerConfig(gen_length=gen_length, block_length=block_length, steps=steps, stop_at_eos=False)
    results = generate(model, tokenizer, PROMPTS, cfg, seed=0)
    for prompt, result in zip(PROMPTS, results):
        ids = encode_prompt(tokenizer, prompt)
        assert result.prompt_ids == ids
        assert result.output_ids == reference_generate(model, ids, gen_length, steps, block_length,
                                                       tokenizer.mask_token_id)
        assert result.nfe == min(steps, gen_length // block_length * block_length)  # zero-commit steps skipped


def test_cfg_matches_reference_formula_and_counts_two_passes(model, tokenizer):
    cfg = SamplerConfig(gen_length=12, block_length=4, steps=6, cfg_scale=1.5, stop_at_eos=False)
    results = generate(model, tokenizer, PROMPTS[:2], cfg)
    for prompt, result in zip(PROMPTS, results):
        ids = encode_prompt(tokenizer, prompt)
        assert result.output_ids == reference_generate(model, ids, 12, 6, 4, tokenizer.mask_token_id, cfg_scale=1.5)
        assert (result.nfe, result.steps) == (12, 6)
    plain = generate(model, tokenizer, PROMPTS[:1], SamplerConfig(gen_length=12, block_length=4, steps=6,
                                                                  stop_at_eos=False))
    assert plain[0].output_ids != results[0].output_ids  # guidance changed something


# ---------------------------------------------------------------------------------------------------------
# Commit rules, checked step by step against full logits recomputed from the history.


def _newly_committed(before: list[int], after: list[int], mask_id: int) -> list[int]:
    return [j for j, (a, b) in enumerate(zip(before, after)) if a == mask_id and b != mask_id]


@torch.no_grad()
def _step_distributions(model, prompt_ids: list[int], region: list[int], mask_id: int) -> torch.Tensor:
    logits = model(torch.tensor([prompt_ids + region])).logits[0, len(prompt_ids):].float()
    logits[:, mask_id] = -math.inf
    return torch.softmax(logits, dim=-1)


def _confidence(probs: torch.Tensor, strategy: str) -> torch.Tensor:
    top2 = probs.topk(2, dim=-1).values
    if strategy == "low_confidence":
        return top2[:, 0]                      # prob of the argmax candidate
    if strategy == "margin":
        return top2[:, 0] - top2[:, 1]
    ent = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    return torch.exp(-ent)


@pytest.mark.parametrize("strategy,rank", [("low_confidence", 2), ("low_confidence", 4), ("margin", 2),
                                           ("entropy", 3)])
def test_threshold_commits_all_above_tau_and_at_least_one(confident_model, tokenizer, strategy, rank):
    mask_id = tokenizer.mask_token_id
    # τ halfway between the rank-th and (rank+1)-th confidence of the first block on the blank canvas: the
    # first step must commit `rank` positions at once, whatever tokenizer the tests were given (a fixed τ
    # was vacuous for some of them: no position ever reached it).
    blank = _step_distributions(confident_model, encode_prompt(tokenizer, PROMPTS[0]), [mask_id] * 24, mask_id)
    top = _confidence(blank, strategy)[:8].sort(descending=True).values
    tau = float(top[rank - 1] + top[rank]) / 2
    cfg = SamplerConfig(gen_length=24, block_length=8, threshold=tau, strategy=strategy, stop_at_eos=False)
    result = generate(confident_model, tokenizer, [PROMPTS[0]], cfg, return_history=True)[0]
    multi = 0
    for before, after in zip(result.history, result.history[1:]):
        probs = _step_distributions(confident_model, result.prompt_ids, before, mask_id)
        conf = _confidence(probs, strategy)
        block = next(j for j, t in enumerate(before) if t == mask_id) // 8
        eligible = [j for j in range(block * 8, block * 8 + 8) if before[j] == mask_id]
        above = [j for j in eligible if conf[j] >= tau]
        expected = above or [max(eligible, key=lambda j: conf[j])]
        committed = _newly_committed(before, after, mask_id)
        assert committed == sorted(expected)
        assert all(after[j] == int(probs[j].argmax()) for j in committed)
        multi += len(committed) > 1
    assert len(_newly_committed(result.history[0], result.history[1], mask_id)) == rank
    assert multi > 0, "the threshold never committed two positions in one step: test is vacuous"
    assert result.nfe == len(result.history) - 1 < 24


@pytest.mark.parametrize("gamma", [0.05, 1.0, 3.0])
def test_entropy_bound_commits_largest_set_under_gamma(confident_model, tokenizer, gamma):
    mask_id = tokenizer.mask_token_id
    cfg = SamplerConfig(gen_length=16, entropy_bound=gamma, stop_at_eos=False)
    result = generate(confident_model, tokenizer, [PROMPTS[2]], cfg, return_history=True)[0]
    for before, after in zip(result.history, result.history[1:]):
        probs = _step_distributions(confident_model, result.prompt_ids, before, mask_id)
        ent = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
        eligible = sorted((j for j, t in enumerate(before) if t == mask_id), key=lambda j: float(ent[j]))
        committed = _newly_committed(before, after, mask_id)
        assert sorted(committed) == sorted(eligible[:len(committed)])  # the lowest-entropy ones
        total = float(ent[committed].sum())
        assert len(committed) == 1 or total <= gamma + 1e-5
        if len(committed) < len(eligible):  # maximal: one more would break the bound
            assert float(ent[eligible[:len(committed) + 1]].sum()) > gamma - 1e-5
    if gamma == 0.05:
        assert result.nfe == 16
    if gamma == 3.0:
        assert result.nfe < 16


def test_fixed_step_commit_counts_and_block_order(model, tokenizer):
    mask_id = tokenizer.mask_token_id
    events = []
    cfg = SamplerConfig(gen_length=30, block_length=10, steps=12, stop_at_eos=False)  # 3 blocks x 4 steps
    result = generate(model, tokenizer, [PROMPTS[1]], cfg, return_history=True, on_step=events.append)[0]
    counts = [len(_newly_committed(a, b, mask_id)) for a, b in zip(result.history, result.history[1:])]
    assert counts == fixed_step_schedule(10, 4) * 3 == [3, 3, 2, 2] * 3
    for step, (before, after) in enumerate(zip(result.history, result.history[1:])):
        block = step // 4
        assert all(block * 10 <= j < block * 10 + 10 for j in _newly_committed(before, after, mask_id))
    assert [e.remaining[0] for e in events] == [30 - sum(counts[:i + 1]) for i in range(12)]
    assert events[-1].done == [True] and events[-1].canvases[0] == result.output_ids
    assert (result.nfe, result.num_generated) == (12, 30)


@pytest.mark.parametrize("cfg", [
    SamplerConfig(gen_length=24, block_length=8, steps=12, stop_at_eos=False),
    SamplerConfig(gen_length=24, threshold=0.6, stop_at_eos=False),
    SamplerConfig(gen_length=24, entropy_bound=1.0, strategy="entropy", stop_at_eos=False),
    SamplerConfig(gen_length=24, steps=8, strategy="random", temperature=1.0, top_p=0.9, stop_at_eos=False),
    SamplerConfig(gen_length=24, block_length=6, steps=8, strategy="margin", temperature=0.7, top_k=20),
], ids=["fixed", "threshold", "entropy_bound", "random_sampled", "margin_sampled"])
def test_committed_tokens_never_change(confident_model, tokenizer, cfg):
    mask_id = tokenizer.mask_token_id
    result = generate(confident_model, tokenizer, [PROMPTS[0]], cfg, seed=7, return_history=True)[0]
    for before, after in zip(result.history, result.history[1:]):
        assert all(a == b for a, b in zip(before, after) if a != mask_id)
        assert sum(t == mask_id for t in after) < sum(t == mask_id for t in before)  # progress every step
    assert mask_id not in result.output_ids
    assert len(result.history) == result.steps + 1


@pytest.mark.parametrize("cfg", [
    SamplerConfig(gen_length=16, block_length=4, steps=8),
    SamplerConfig(gen_length=16, threshold=0.5, block_length=8),
    SamplerConfig(gen_length=16, steps=16, temperature=0.9, top_k=50),
    SamplerConfig(seq_len=48, steps=12, strategy="random", temperature=1.0),
    SamplerConfig(gen_length=8, cfg_scale=0.5),
], ids=["fixed", "threshold", "sampled", "seq_len", "cfg"])
def test_batched_equals_unbatched(confident_model, tokenizer, cfg):
    batched = generate(confident_model, tokenizer, PROMPTS, cfg, seed=11)
    chunked = generate(confident_model, tokenizer, PROMPTS, cfg, seed=11, batch_size=2)
    for i, prompt in enumerate(PROMPTS):
        single = generate(confident_model, tokenizer, [prompt], cfg, seed=11 + i)[0]
        for other in (batched[i], chunked[i]):
            assert (other.prompt_ids, other.output_ids, other.text, other.nfe) == \
                (single.prompt_ids, single.output_ids, single.text, single.nfe)
    if cfg.seq_len:
        assert all(len(r.prompt_ids) + len(r.output_ids) == 48 for r in batched)
    assert len({len(r.prompt_ids) for r in batched}) == 3  # really different prompt lengths


def test_infilling_fills_masks_and_leaves_text_untouched(model, tokenizer):
    mask_id = tokenizer.mask_token_id
    text = "The king [MASK*5] the sea and[MASK*2] bread."
    for gen_length in (0, 4):
        cfg = SamplerConfig(gen_length=gen_length, threshold=0.2)
        result = generate(model, tokenizer, [text], cfg, chat=False)[0]
        canvas = encode_prompt(tokenizer, text, chat=False) + [mask_id] * gen_length
        assert canvas.count(mask_id) == 7 + gen_length
        first = canvas.index(mask_id)
        assert result.prompt_ids == canvas[:first]
        final = result.prompt_ids + result.output_ids
        assert len(final) == len(canvas)
        assert all(f == c for f, c in zip(final, canvas) if c != mask_id)  # fixed text untouched
        assert mask_id not in final
        assert result.num_generated == 7 + gen_length
    assert tokenizer.decode(result.prompt_ids, skip_special_tokens=True) == "The king "


def test_top_k_and_top_p_restrict_the_support():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 64, generator=g).double()
    probs = torch.softmax(logits[0], -1)
    order = probs.argsort(descending=True).tolist()
    top5 = set(order[:5])
    cum, nucleus = 0.0, set()
    for t in order:  # smallest top set with mass >= 0.7
        nucleus.add(t)
        cum += float(probs[t])
        if cum >= 0.7:
            break
    assert 1 < len(nucleus) < 64

    def draws(top_k=None, top_p=None, n=3000):
        return set(decide(logits.expand(n, -1), 1.0, "low_confidence", [(n, g)], top_k, top_p).candidates.tolist())

    assert draws(top_k=5) == top5
    assert draws(top_p=0.7) == nucleus
    # top-p then applies to the renormalised top-k distribution, so the support only shrinks
    assert set(order[:2]) <= draws(top_k=5, top_p=0.7) < top5
    assert len(draws()) > len(top5 | nucleus)  # unfiltered sampling reaches further: the checks are not vacuous
    assert (filter_logits(logits, top_p=1.0) == logits).all()
    assert decide(logits, 0.0, "low_confidence", [], 1, 0.1).candidates.item() == order[0]


def test_top_k_one_sampling_equals_greedy(model, tokenizer):
    greedy = generate(model, tokenizer, PROMPTS, SamplerConfig(gen_length=12, steps=6))
    sampled = generate(model, tokenizer, PROMPTS, SamplerConfig(gen_length=12, steps=6, temperature=2.0, top_k=1))
    assert [r.output_ids for r in sampled] == [r.output_ids for r in greedy]


def test_sampling_is_seeded(model, tokenizer):
    cfg = SamplerConfig(gen_length=12, steps=6, temperature=1.0)
    a, b, c = (generate(model, tokenizer, [PROMPTS[0]], cfg, seed=s)[0].output_ids for s in (1, 1, 2))
    assert a == b != c


def test_early_stop_fills_eos_and_saves_forward_passes(tokenizer):
    ids = special_ids(tokenizer)
    model = random_model(tokenizer, seed=2)
    with torch.no_grad():  # a model that likes to end its turn
        model.decoder.bias[ids.eot] = 8.0
    cfg = SamplerConfig(gen_length=24, steps=24, block_length=4)
    full = generate(model, tokenizer, [PROMPTS[0]], SamplerConfig(gen_length=24, steps=24, block_length=4,
                                                                  stop_at_eos=False), return_history=True)[0]
    stopped = generate(model, tokenizer, [PROMPTS[0]], cfg, return_history=True)[0]
    assert ids.eot in full.output_ids
    assert stopped.nfe < full.nfe == 24
    first = next(j for j, t in enumerate(stopped.output_ids) if t in (ids.eot, ids.eos))
    # Up to the moment it stopped it made exactly the same decisions as the full run.
    assert stopped.history[:-1] == full.history[:stopped.nfe]
    last = full.history[stopped.nfe]
    assert stopped.history[-1] == stopped.output_ids
    assert all(t != tokenizer.mask_token_id for t in last[:first])
    for j, t in enumerate(stopped.output_ids):
        assert t == (last[j] if last[j] != tokenizer.mask_token_id else ids.eos)
    assert tokenizer.mask_token_id not in stopped.output_ids
    assert stopped.text == tokenizer.decode(stopped.output_ids[:first], skip_special_tokens=True)


def test_denoiser_seam_receives_only_block_masks(model, tokenizer):
    """A Denoiser subclass (e.g. a KV-cached forward) sees the canvas and exactly the positions to decide."""
    seen = []

    class Recording(ModelDenoiser):
        def logits(self, canvas, attention_mask, select, rows):
            seen.append((select.clone(), canvas.clone(), rows.clone()))
            return super().logits(canvas, attention_mask, select, rows)

    assert issubclass(Recording, Denoiser)
    cfg = SamplerConfig(gen_length=8, block_length=4, steps=4, stop_at_eos=False)
    via_seam = generate(Recording(model), tokenizer, PROMPTS[:2], cfg)
    direct = generate(model, tokenizer, PROMPTS[:2], cfg)
    assert [r.output_ids for r in via_seam] == [r.output_ids for r in direct]
    mask_id = tokenizer.mask_token_id
    for select, canvas, rows in seen:
        assert (canvas[select] == mask_id).all()
        assert rows.tolist() == [0, 1]
        # The masks of one block only: at most block_length per row, contiguous span of 4.
        for r in range(select.shape[0]):
            cols = select[r].nonzero().flatten().tolist()
            assert 1 <= len(cols) <= 4 and cols[-1] - cols[0] < 4


def test_rows_join_a_running_batch_and_leave_with_their_own_settings(confident_model, tokenizer):
    """The server's use: rows with different settings join at step boundaries and leave when done; each
    gets exactly the tokens, NFE and steps of its own unbatched generate() call."""
    configs = [SamplerConfig(gen_length=16, block_length=8, steps=8, stop_at_eos=False),
               SamplerConfig(gen_length=12, threshold=0.5),
               SamplerConfig(gen_length=16, temperature=0.8, top_p=0.9),
               SamplerConfig(gen_length=8, block_length=4, steps=4, cfg_scale=1.0, stop_at_eos=False),
               SamplerConfig(gen_length=10, strategy="margin", entropy_bound=1.0)]
    solo = [generate(confident_model, tokenizer, [PROMPTS[i % 3]], cfg, seed=5 + i)[0] for i, cfg in enumerate(configs)]
    forgotten = []

    class Recording(ModelDenoiser):
        def forget(self, rows):
            forgotten.extend(rows)

    batch = RunningBatch(Recording(confident_model), tokenizer)
    joins, names, results, step, widths = {0: [0, 4], 2: [1, 2], 5: [3]}, {}, {}, 0, set()
    while len(results) < len(configs):
        for i in joins.get(step, []):
            names[batch.add(PROMPTS[i % 3], configs[i].validate(), seed=5 + i)] = i
        batch.step_once()
        step += 1
        widths.add(len(batch.rows))
        for row in [r for r in batch.rows if r.done]:
            results[names[row.id]] = batch.result(row.id)
            batch.release(row.id)
    assert max(widths) >= 3  # rows really shared steps
    for i, expected in enumerate(solo):
        got = results[i]
        assert (got.output_ids, got.text, got.nfe, got.steps) == (expected.output_ids, expected.text,
                                                                   expected.nfe, expected.steps), i
    assert batch.rows == [] and batch.canvas.shape == (0, 0)
    assert sorted(forgotten) == list(range(len(configs) + 1))  # every row id and the guided row's copy


def test_as_denoiser_keeps_a_denoiser(model):
    wrapped = as_denoiser(model)
    assert isinstance(wrapped, ModelDenoiser) and as_denoiser(wrapped) is wrapped


@pytest.mark.parametrize("kwargs,message", [
    (dict(steps=0), "--num_steps must be at least 1"),
    (dict(gen_length=32, block_length=8, steps=6), "--num_steps 6 does not divide over 4 blocks .* such as 4 or 8"),
    (dict(gen_length=16, block_length=32), "--block_length 32 is larger than the generated length 16"),
    (dict(top_p=0.0), "--top_p must be in"),
    (dict(top_p=1.5), "--top_p must be in"),
    (dict(strategy="greedy"), "--strategy must be one of"),
    (dict(threshold=0.9, entropy_bound=1.0), "pass one of them"),
    (dict(threshold=0.9, strategy="random"), "--threshold needs a confidence"),
])
def test_bad_configs_are_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        SamplerConfig(**kwargs).validate()


def test_prompt_dependent_errors(model, tokenizer):
    with pytest.raises(UsageError, match=r"--seq_len 5 leaves no room.* is \d+ tokens"):
        generate(model, tokenizer, [PROMPTS[0]], SamplerConfig(seq_len=5))
    with pytest.raises(UsageError, match="nothing to generate"):
        generate(model, tokenizer, ["no masks here"], SamplerConfig(gen_length=0), chat=False)
    with pytest.raises(UsageError, match="exceeds the model's 256 positions"):
        generate(model, tokenizer, ["x"], SamplerConfig(gen_length=300))


# ---------------------------------------------------------------------------------------------------------
# The step's math in chunks (issue 11, point 9): same tokens and the same distribution as the full-size path.


def test_decide_in_chunks_equals_the_full_size_formulas():
    """Chunked candidates/confidences = plain formulas on whole [N, V] tensors with the same random draws:
    x̂ by inverting the cumulative softmax(filtered logits / T) (here in one float64 pass, no blocks),
    confidences from the softmax."""
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(23, 97, generator=g)
    logits[:, 5] = float("-inf")  # the mask id
    counts = [7, 1, 15]
    for temperature, top_k, top_p in [(0.0, None, None), (0.7, None, None), (1.3, 20, 0.9)]:
        for strategy in ("low_confidence", "margin", "entropy", "random"):
            gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
            chunked = decide(logits, temperature, strategy, list(zip(counts, gens)), top_k, top_p,
                             need_entropy=True, chunk_elements=2 * 97)  # two positions per chunk
            gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
            if temperature:  # one float64 uniform per position, row by row
                u = torch.cat([torch.rand(n, generator=gi, dtype=torch.float64) for n, gi in zip(counts, gens)])
                probs64 = torch.softmax(filter_logits(logits.double() / temperature, top_k, top_p), -1)
                cdf = probs64.cumsum(-1)
                expected = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
            else:
                expected = logits.argmax(-1)
            uniform = torch.cat([torch.rand(n, generator=gi) for n, gi in zip(counts, gens)])
            probs = torch.softmax(logits, -1)
            assert torch.equal(chunked.candidates, expected)
            chosen = probs.gather(-1, expected[:, None]).squeeze(-1)
            top2 = probs.topk(2, -1).values
            ent = torch.special.entr(probs).sum(-1)
            reference = {"low_confidence": chosen, "margin": top2[:, 0] - top2[:, 1], "entropy": torch.exp(-ent),
                         "random": uniform}[strategy]
            assert torch.allclose(chunked.confidence, reference, rtol=1e-5, atol=1e-7)
            assert torch.allclose(chunked.entropy, ent, rtol=1e-5, atol=1e-6)


def test_temperature_draws_follow_softmax_of_logits_over_t():
    """The chunked sampler draws softmax(logits / T): chi-square over 40k draws of a 6-token vocabulary."""
    from dlm.policies import decide

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).expand(40_000, -1).contiguous()
    gen = torch.Generator().manual_seed(0)
    draws = decide(logits, 0.7, "low_confidence", [(40_000, gen)], chunk_elements=6 * 999).candidates
    observed = torch.bincount(draws, minlength=6).double()
    expected = torch.softmax(logits[0].double() / 0.7, -1) * 40_000
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # 5 degrees of freedom: p = 0.001


@pytest.mark.parametrize("cfg", [
    SamplerConfig(gen_length=12, steps=6, temperature=0.9),
    SamplerConfig(gen_length=12, steps=4, temperature=1.5, top_k=30, top_p=0.9, strategy="margin"),
    SamplerConfig(gen_length=12, block_length=4, temperature=0.8, entropy_bound=1.0),
    SamplerConfig(gen_length=12, steps=12, strategy="random", temperature=0.5),
])
def test_chunked_sampler_gives_the_tokens_of_the_unchunked_one(model, tokenizer, cfg, monkeypatch):
    import dlm.policies

    whole = generate(model, tokenizer, PROMPTS, cfg, seed=7)
    monkeypatch.setattr(dlm.policies, "CHUNK_ELEMENTS", 1)  # one position per chunk
    chunked = generate(model, tokenizer, PROMPTS, cfg, seed=7)
    assert [r.output_ids for r in chunked] == [r.output_ids for r in whole]


def test_step_events_are_read_lazily_and_match_the_history(model, tokenizer):
    events = []
    result = generate(model, tokenizer, [PROMPTS[0]], SamplerConfig(gen_length=8, steps=4), return_history=True,
                      on_step=events.append)[0]
    assert "canvases" not in vars(events[0])  # nothing was read back for a listener that did not look
    assert [e.canvases[0] for e in events] == result.history[1:]
    assert [e.remaining[0] for e in events] == [6, 4, 2, 0]
