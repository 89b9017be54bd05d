"""Tokenizer preparation: digits, chat-template prefix property, reserved-token reuse, refusals, tokenizer.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, GPT2Config, PreTrainedTokenizerFast

from dlm.errors import UsageError
from dlm.tokenization import (CHAT_TOKENS, encode_chat, load_mlm_tokenizer, prepare_tokenizer, render_chat,
                              smallest_uint_dtype, special_ids)

TURNS = [("What is 12+7?", "19"), (" and 100 - 1 ?\n", "99\n"), ("Say hi.", " Hi! ")]


def _chat(n_turns: int, system: bool) -> list[dict]:
    messages = [{"role": "system", "content": "Be brief."}] if system else []
    for user, assistant in TURNS[:n_turns]:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


def _wordpiece_bert_tokenizer(corpus: str, mask: bool = True) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer whose [unusedN] entries live in the vocabulary (as in BERT)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + (["[MASK]"] if mask else []) + [f"[unused{i}]" for i in range(6)]
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.train_from_iterator([corpus], trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials,
                                                                    show_progress=False))
    kwargs = dict(unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]")
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs, **({"mask_token": "[MASK]"} if mask else {}))


def test_digits_are_split_one_per_token(tokenizer):
    for text in ("47+38=85", "x 1234567890 y", "sort: 7 2 9 2"):
        digit_tokens = [t for t in tokenizer.tokenize(text) if any(c.isdigit() for c in t)]
        assert all(len(t.lstrip("Ġ")) == 1 for t in digit_tokens), digit_tokens
        assert sum(len(t.lstrip("Ġ")) for t in digit_tokens) == sum(c.isdigit() for c in text)
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("n_turns", [1, 2, 3])
def test_generation_prompt_is_a_token_prefix(tokenizer, n_turns, system):
    chat = _chat(n_turns, system)
    full = encode_chat(tokenizer, chat)
    prompt = encode_chat(tokenizer, chat[:-1], add_generation_prompt=True)
    assert full[:len(prompt)] == prompt and len(prompt) < len(full)
    ids = special_ids(tokenizer)
    assert full[0] == ids.bos and prompt[-1] == ids.assistant and full[-1] == ids.eot
    assert full.count(ids.eot) == len(chat) and full.count(ids.assistant) == n_turns
    # The answer tokens are exactly the final assistant content followed by the end-of-turn marker.
    answer = tokenizer.decode(full[len(prompt):], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert answer == chat[-1]["content"] + "<|eot|>"


def test_bert_wordpiece_reuses_unused_entries_and_keeps_prefix_property(corpus_text):
    raw = _wordpiece_bert_tokenizer(corpus_text)
    size = len(raw)
    unused_ids = [raw.convert_tokens_to_ids(f"[unused{i}]") for i in range(4)]
    tok = prepare_tokenizer(raw)
    assert len(tok) == size, "chat markers must reuse reserved entries, not grow the vocabulary"
    assert [tok.convert_tokens_to_ids(t) for t in CHAT_TOKENS] == unused_ids
    ids = special_ids(tok)
    assert (ids.bos, ids.eos) == (tok.cls_token_id, tok.sep_token_id) and ids.mask == tok.mask_token_id
    for n in (1, 2, 3):
        chat = _chat(n, system=True)
        full = encode_chat(tok, chat)
        prompt = encode_chat(tok, chat[:-1], add_generation_prompt=True)
        assert full[:len(prompt)] == prompt
    assert render_chat(tok, _chat(1, False)) == "[CLS]<|user|>What is 12+7?<|eot|><|assistant|>19<|eot|>"


def test_refuses_tokenizer_without_mask_and_non_masked_lm(tmp_path, corpus_text, tokenizer_dir):
    no_mask = tmp_path / "no_mask"
    _wordpiece_bert_tokenizer(corpus_text, mask=False).save_pretrained(no_mask)
    with pytest.raises(UsageError, match=r"^--hf_model_name .*no_mask: the tokenizer has no mask token"):
        load_mlm_tokenizer(str(no_mask))
    gpt = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100).save_pretrained(gpt)
    with pytest.raises(UsageError, match=r"^--hf_model_name .*gpt2 is not a masked language model"):
        load_mlm_tokenizer(str(gpt))
    assert load_mlm_tokenizer(str(tokenizer_dir)).chat_template  # tokenizer-only folder is accepted


def test_smallest_uint_dtype():
    assert [smallest_uint_dtype(n) for n in (2, 256, 257, 65536, 65537, 50368)] == \
        ["uint8", "uint8", "uint16", "uint16", "uint32", "uint16"]


def test_tokenizer_cli_trains_saves_and_shows(tmp_path, corpus_text):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text)
    out = tmp_path / "tok"
    proc = subprocess.run([sys.executable, str(ROOT / "tokenizer.py"), "--train_from", str(corpus),
                           "--vocab_size", "400", "--save_to", str(out), "--show", "What is 12+7?"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 400 and tok.mask_token == "[MASK]" and tok.chat_template
    shown = tok("What is 12+7?", add_special_tokens=False)["input_ids"]
    assert f"ids: {shown}" in proc.stdout
    assert "generation prompt is a token prefix of the training rendering: True" in proc.stdout
    assert "[CLS]<|system|>You are terse.<|eot|><|user|>What is 12+7?<|eot|><|assistant|>OK.<|eot|>" in proc.stdout
    # Prepared again from the saved folder, it is unchanged (idempotent).
    again = load_mlm_tokenizer(str(out))
    assert again.get_vocab() == tok.get_vocab() and again.chat_template == tok.chat_template


def test_folder_without_tokenizer_files_is_named(tmp_path):
    from dlm.tokenization import load_tokenizer

    (tmp_path / "notes.txt").write_text("not a tokenizer")
    with pytest.raises(UsageError, match="has no tokenizer files"):
        load_tokenizer(str(tmp_path))
