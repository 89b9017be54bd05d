"""The canvas-length error blames what is too long: the prompt itself, or the requested generation."""

from __future__ import annotations

import pytest
from transformers import AutoModelForMaskedLM

from dlm.errors import UsageError
from dlm.sampling import SamplerConfig, generate


def test_too_long_prompt_is_named_with_its_length(tiny_model_dir, tokenizer):
    model = AutoModelForMaskedLM.from_pretrained(tiny_model_dir).eval()
    limit = model.config.max_position_embeddings
    long_prompt = " ".join(["one two three"] * limit)
    n = len(tokenizer(long_prompt, add_special_tokens=False)["input_ids"])
    assert n > limit
    cfg = SamplerConfig(gen_length=4, block_length=4, steps=1)
    with pytest.raises(UsageError) as err:
        generate(model, tokenizer, ["hi", long_prompt], cfg, chat=False)
    msg = str(err.value)
    assert msg.startswith("the prompt (prompt 2) is ") and f"model has {limit} positions" in msg
    assert "--gen_length" not in msg and "\n" not in msg
    # the prompt fits but prompt + generation does not: the generation flags are named, with the room left
    with pytest.raises(UsageError, match=rf"exceeds the model's {limit} positions: lower --seq_len/--gen_length") as err:
        generate(model, tokenizer, ["hi"], SamplerConfig(gen_length=limit, block_length=limit, steps=1), chat=False)
    prompt_len = int(str(err.value).split("(")[1].split(" prompt")[0])
    assert 0 < prompt_len < 5 and f"to at most {limit - prompt_len} generated tokens" in str(err.value)
