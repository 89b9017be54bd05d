"""Prompt isolation (dlm.isolation) and the prompt-cached denoisers (dlm.cache) on real tiny encoders.

Exactness: the cached logits equal the full isolated forward (transformers' own forward with the isolation
mask) to 1e-5 in fp32, for ModernBERT with prompts longer than its local window, BERT and RoBERTa; and
`generate` gives the same tokens with --prompt_cache exact and off (fixed-step and threshold, batched
prompts of different lengths).
"""

from __future__ import annotations

import logging

import pytest
import torch

from dlm.cache import PromptCacheDenoiser, select_denoiser
from dlm.errors import UsageError
from dlm.isolation import isolation_attention_mask, prompt_lengths, random_prompt_lengths
from dlm.modeling import selected_logits
from dlm.sampling import SamplerConfig, generate

WINDOW = 4  # ModernBERT local_attention 8: each local layer sees 4 positions either side


def encoder(kind: str, vocab: int, pad_id: int, isolated: bool = True) -> torch.nn.Module:
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        ModernBertConfig,
        ModernBertForMaskedLM,
        RobertaConfig,
        RobertaForMaskedLM,
    )

    torch.manual_seed(0)
    small = {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "pad_token_id": pad_id}
    if kind == "modernbert":  # layers: global, local, local
        model = ModernBertForMaskedLM(ModernBertConfig(**small, num_hidden_layers=3, global_attn_every_n_layers=3,
                                                       local_attention=2 * WINDOW, max_position_embeddings=256,
                                                       bos_token_id=pad_id, eos_token_id=pad_id, cls_token_id=pad_id,
                                                       sep_token_id=pad_id))
    elif kind == "bert":
        model = BertForMaskedLM(BertConfig(**small, num_hidden_layers=2, max_position_embeddings=256))
    else:
        model = RobertaForMaskedLM(RobertaConfig(**small, num_hidden_layers=2, max_position_embeddings=258))
    model.config.prompt_isolation = isolated
    return model.eval()


def canvas_batch(prompt_lens, lengths, mask_id, seed=0):
    g = torch.Generator().manual_seed(seed)
    canvas = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    attention = torch.zeros_like(canvas)
    for b, (p, n) in enumerate(zip(prompt_lens, lengths)):
        canvas[b, :n] = torch.randint(5, 90, (n,), generator=g)
        canvas[b, p:n] = mask_id
        attention[b, :n] = 1
    return canvas, attention


def test_isolation_mask_rule_and_sliding_window():
    model = encoder("modernbert", 100, 0)
    ids = torch.randint(5, 90, (2, 20))
    prompt = torch.tensor([12, 7])
    masks = isolation_attention_mask(model, ids, prompt)
    q, k = torch.arange(20)[:, None], torch.arange(20)[None, :]
    for b, p in enumerate(prompt.tolist()):
        rule = (k < p) | (q >= p)
        assert torch.equal(masks["full_attention"][b, 0], rule)
        assert torch.equal(masks["sliding_attention"][b, 0], rule & ((q - k).abs() <= WINDOW))
    # the prompt's outputs do not depend on the answer; the answer's depend on the prompt
    other = ids.clone()
    other[0, 12:], other[1, 7:] = 3, 3
    a = model(input_ids=ids, attention_mask=masks).logits
    b = model(input_ids=other, attention_mask=isolation_attention_mask(model, other, prompt)).logits
    assert torch.equal(a[0, :12], b[0, :12]) and torch.equal(a[1, :7], b[1, :7])
    assert not torch.allclose(a[0, 12:], b[0, 12:])


def test_prompt_lengths_split_before_the_last_answer_run():
    answer = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1],     # single turn: prompt is 3 tokens
                           [0, 1, 1, 0, 0, 1, 1, 1],     # two turns: the first answer belongs to the prompt
                           [1, 1, 1, 1, 1, 1, 1, 1]])    # no prompt
    assert prompt_lengths(answer).tolist() == [3, 5, 0]
    drawn = random_prompt_lengths(1000, 16, torch.Generator().manual_seed(0))
    assert drawn.min() == 0 and drawn.max() == 15 and abs(drawn.float().mean().item() - 7.5) < 0.5
    again = random_prompt_lengths(1000, 16, torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)


@pytest.mark.parametrize("kind", ["modernbert", "bert", "roberta"])
def test_cached_logits_equal_the_full_isolated_forward(kind):
    mask_id = 3
    model = encoder(kind, 100, 0)
    prompts, lengths = [13, 21, 6], [31, 28, 20]  # prompts longer than ModernBERT's local window, and shorter
    canvas, attention = canvas_batch(prompts, lengths, mask_id)
    denoiser = PromptCacheDenoiser(model, mask_id, "exact")
    rows = torch.arange(3)
    for step in range(4):
        select = canvas == mask_id
        got = denoiser.logits(canvas, attention, select, rows)
        full = selected_logits(model, canvas, select, isolation_attention_mask(model, canvas, torch.tensor(prompts),
                                                                               attention))
        assert (got - full).abs().max().item() < 1e-5, step
        for b in range(3):  # commit the first masked position of each row
            canvas[b, int(select[b].nonzero()[0])] = 40 + step
    assert denoiser.refreshed_rows == 3 and denoiser.cached_rows == 9  # the prompts ran once


def test_rows_leave_and_a_new_prompt_on_a_row_number_is_recomputed():
    mask_id = 3
    model = encoder("modernbert", 100, 0)
    canvas, attention = canvas_batch([10, 15], [20, 24], mask_id)
    denoiser = PromptCacheDenoiser(model, mask_id, "exact")
    denoiser.logits(canvas, attention, canvas == mask_id, torch.arange(2))
    # row 0 finished: row 1 alone, then row 0's number reused by another prompt
    one, att1 = canvas[1:, :24], attention[1:, :24]
    full = selected_logits(model, one, one == mask_id, isolation_attention_mask(model, one, torch.tensor([15]), att1))
    assert (denoiser.logits(one, att1, one == mask_id, torch.tensor([1])) - full).abs().max() < 1e-5
    new, att2 = canvas_batch([8], [18], mask_id, seed=5)
    full = selected_logits(model, new, new == mask_id, isolation_attention_mask(model, new, torch.tensor([8]), att2))
    assert (denoiser.logits(new, att2, new == mask_id, torch.tensor([0])) - full).abs().max() < 1e-5
    assert denoiser.refreshed_rows == 3


def test_a_released_row_leaves_no_state_in_the_cache(isolated_model, tokenizer):
    """A server's rows come and go: the running batch tells the cache, which drops their prompts and K/V."""
    from dlm.sampling import RunningBatch

    denoiser = select_denoiser(isolated_model, "exact", tokenizer.mask_token_id)
    batch = RunningBatch(denoiser, tokenizer)
    cfg = SamplerConfig(gen_length=8, block_length=4, steps=8, prompt_cache="exact").validate()
    ids = [batch.add(p, cfg, seed=0) for p in PROMPTS]
    batch.step_once()
    assert set(denoiser.entries) == set(denoiser.prompts) == set(ids)
    batch.release(ids[0])
    assert set(denoiser.entries) == set(denoiser.prompts) == {ids[1]}
    while not batch.rows[0].done:
        batch.step_once()
    assert batch.result(ids[1]).output_ids == generate(isolated_model, tokenizer, [PROMPTS[1]], cfg,
                                                       seed=0)[0].output_ids
    batch.release(ids[1])
    assert not denoiser.entries and not denoiser.prompts


@pytest.fixture(scope="module")
def isolated_model(tokenizer):
    from dlm.modeling import build_from_scratch

    torch.manual_seed(0)
    model = build_from_scratch("tiny", tokenizer, max_position_embeddings=512, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=3, num_attention_heads=2, local_attention=2 * WINDOW,
                               global_attn_every_n_layers=3, initializer_range=0.3)  # peaked enough for τ
    model.config.prompt_isolation = True
    return model.eval()


PROMPTS = ["What is 12+7?", "Write the sum of 1234 and 4321, then say whether the result is even or odd. Answer:"]


@pytest.mark.parametrize("rule", [{"steps": 6}, {"threshold": None}, {"steps": 6, "cfg_scale": 1.0}])
def test_generate_same_tokens_with_exact_cache_and_without(isolated_model, tokenizer, rule):
    def sample(cache):
        cfg = SamplerConfig(gen_length=12, block_length=4, prompt_cache=cache, **rule)
        return generate(isolated_model, tokenizer, PROMPTS, cfg, seed=0)

    if "threshold" in rule:  # a τ at which this random model commits several, but not all, positions per pass
        for rule["threshold"] in (0.02, 0.03, 0.04, 0.05, 0.07, 0.1, 0.15):
            if any(3 < r.nfe < r.num_generated for r in sample("off")):
                break

    off, exact = sample("off"), sample("exact")
    assert [r.output_ids for r in off] == [r.output_ids for r in exact]
    assert [r.nfe for r in off] == [r.nfe for r in exact]
    assert len(off[0].prompt_ids) != len(off[1].prompt_ids)
    if "threshold" in rule:  # the rule committed several positions in some step (not one per pass)
        assert any(r.nfe < r.num_generated for r in off)
    # auto picks the exact cache for an isolated model, and it really caches
    denoiser = select_denoiser(isolated_model, "auto", tokenizer.mask_token_id)
    assert isinstance(denoiser, PromptCacheDenoiser) and denoiser.mode == "exact"
    again = generate(denoiser, tokenizer, PROMPTS, SamplerConfig(gen_length=12, block_length=4, **rule), seed=0)
    assert [r.output_ids for r in again] == [r.output_ids for r in off]
    copies = 2 if rule.get("cfg_scale") else 1  # guidance adds an unconditional copy of each row
    assert denoiser.refreshed_rows == 2 * copies and denoiser.cached_rows > 2 * copies


def test_approx_equals_off_when_every_step_starts_a_block_and_exact_is_refused(tokenizer, isolated_model):
    from dlm.modeling import build_from_scratch

    torch.manual_seed(0)
    plain = build_from_scratch("tiny", tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2).eval()
    # one step per block: each step refreshes the prefix, so approx is the plain forward
    cfg = {"gen_length": 8, "block_length": 2, "steps": 4}
    off = generate(plain, tokenizer, PROMPTS, SamplerConfig(**cfg, prompt_cache="off"), seed=1)
    approx = generate(plain, tokenizer, PROMPTS, SamplerConfig(**cfg, prompt_cache="approx"), seed=1)
    assert [r.output_ids for r in off] == [r.output_ids for r in approx]
    # with several steps per block it caches (and runs to the end)
    denoiser = select_denoiser(plain, "approx", tokenizer.mask_token_id, block_length=4)
    out = generate(denoiser, tokenizer, PROMPTS, SamplerConfig(gen_length=8, block_length=4, steps=8), seed=1)
    assert denoiser.cached_rows > 0 and all(tokenizer.mask_token_id not in r.output_ids for r in out)
    assert select_denoiser(plain, "auto", tokenizer.mask_token_id) is None
    with pytest.raises(UsageError, match="--prompt_cache exact: the model was trained without --prompt_isolation"):
        generate(plain, tokenizer, PROMPTS[:1], SamplerConfig(gen_length=4, prompt_cache="exact"))


def test_other_architecture_says_so_in_one_line_and_runs_the_full_forward(tokenizer, caplog):
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(0)
    model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=len(tokenizer), dim=32, hidden_dim=64, n_layers=1,
                                                   n_heads=2, pad_token_id=tokenizer.pad_token_id)).eval()
    cfg = {"gen_length": 6, "block_length": 3}
    with caplog.at_level(logging.WARNING, logger="dlm.cache"):
        approx = generate(model, tokenizer, PROMPTS, SamplerConfig(**cfg, prompt_cache="approx"), seed=0)
    assert [r.message for r in caplog.records] == [("prompt cache: not available for DistilBertForMaskedLM; "
                                                   "running the full forward")]
    off = generate(model, tokenizer, PROMPTS, SamplerConfig(**cfg, prompt_cache="off"), seed=0)
    assert [r.output_ids for r in off] == [r.output_ids for r in approx]
