"""Model loading, strict weights, embedding growth, and the sparse MLM head."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import (AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForMaskedLM, GPT2Config,
                          RobertaConfig, RobertaForMaskedLM)

from dlm.errors import UsageError
from dlm.modeling import (build_from_scratch, load_checkpoint, load_masked_lm, load_weights_strict,
                          resize_for_tokenizer, selected_logits, sparse_head_module, unwrap)
from dlm.tokenization import train_tokenizer


def _bert_like(cls, cfg_cls):
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=80)
    return cls(cfg).eval()


@pytest.mark.parametrize("name", ["modernbert", "bert", "roberta"])
def test_sparse_head_equals_full_logits(name, tiny_model_dir):
    if name == "modernbert":
        model = AutoModelForMaskedLM.from_pretrained(tiny_model_dir).eval()
    elif name == "bert":
        model = _bert_like(BertForMaskedLM, BertConfig)
    else:
        model = _bert_like(RobertaForMaskedLM, RobertaConfig)
    assert sparse_head_module(model) is not None
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 500, (3, 24), generator=g)
    select = torch.rand(3, 24, generator=g) < 0.3
    attention = torch.ones_like(ids)
    attention[1, 18:] = 0
    sparse = selected_logits(model, ids, select, attention)
    full = selected_logits(model, ids, select, attention, sparse=False)
    assert sparse.shape == (int(select.sum()), model.config.vocab_size)
    torch.testing.assert_close(sparse, full, atol=1e-5, rtol=1e-5)


def test_sparse_head_gradients_match(tiny_model_dir):
    model = AutoModelForMaskedLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(10, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    select = torch.zeros_like(ids, dtype=torch.bool)
    select[:, ::3] = True
    grads = []
    for sparse in (True, False):
        model.zero_grad()
        selected_logits(model, ids, select, sparse=sparse).logsumexp(-1).sum().backward()
        grads.append(model.model.embeddings.tok_embeddings.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_checkpoint_folder_and_bare_safetensors_round_trip(tiny_model_dir):
    model, tok = load_checkpoint(str(tiny_model_dir))
    again, _ = load_checkpoint(str(tiny_model_dir / "model.safetensors"), hf_model_name=str(tiny_model_dir))
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert tok.chat_template and tok.mask_token_id is not None


def test_strict_loading_names_mismatched_keys(tiny_model_dir, tmp_path):
    model = AutoModelForMaskedLM.from_pretrained(tiny_model_dir)
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items() if "decoder" not in k}
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(UsageError) as err:
        load_weights_strict(model, path)
    msg = str(err.value)
    assert "unexpected 1: extra.weight" in msg and "missing 1: decoder.bias" in msg and "\n" not in msg
    state["model.final_norm.weight"] = torch.zeros(7)
    save_file(state, str(path))
    with pytest.raises(UsageError, match=r"mis-shaped 1: model.final_norm.weight \(7,\) vs \(32,\)"):
        load_weights_strict(model, path)


def test_strict_loading_accepts_tied_keys_absent_or_present(tiny_model_dir, tmp_path):
    trained = AutoModelForMaskedLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for v in trained.parameters():
            v.add_(1.0)
    full = {k: v.clone().contiguous() for k, v in trained.state_dict().items()}  # both names of the tied matrix
    save_file(full, str(tmp_path / "full.safetensors"))
    trained.save_pretrained(tmp_path / "hf")  # transformers drops the tied alias
    for path in (tmp_path / "full.safetensors", tmp_path / "hf" / "model.safetensors"):
        model = AutoModelForMaskedLM.from_pretrained(tiny_model_dir)
        load_weights_strict(model, path)
        for k, v in model.state_dict().items():
            assert torch.equal(v, full[k]), (path.name, k)
        assert model.decoder.weight.data_ptr() == model.model.embeddings.tok_embeddings.weight.data_ptr()


def test_truncated_safetensors_is_one_line_naming_the_file(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    for path in (folder, weights):
        with pytest.raises(UsageError, match=r"model.safetensors is truncated or not a safetensors file \(incomplete "
                                             r"metadata, file not fully covered\)"):
            load_checkpoint(str(path), hf_model_name=str(tiny_model_dir))
    weights.write_bytes(b"")
    with pytest.raises(UsageError, match=r"model.safetensors is truncated or not a safetensors file \(header too small"):
        load_checkpoint(str(folder))


class _Marker:
    """A pickle whose loading would run code: it creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_only_folder_is_refused_even_with_a_stray_safetensors(tiny_model_dir, tmp_path):
    import shutil

    model = AutoModelForMaskedLM.from_pretrained(tiny_model_dir)
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # a loadable .bin: the old check unpickled it
    save_file({"x": torch.zeros(1)}, str(folder / "junk.safetensors"))
    with pytest.raises(UsageError, match=r"has no model.safetensors .*pickle-only \(found pytorch_model.bin"):
        load_checkpoint(str(folder))
    marker = tmp_path / "pwned"
    torch.save({"w": _Marker(marker)}, folder / "pytorch_model.bin")
    for load in (lambda: load_checkpoint(str(folder)), lambda: load_masked_lm(str(folder))):
        with pytest.raises(UsageError):  # transformers itself is told use_safetensors=True
            load()
    assert not marker.exists()
    # a sharded index whose shard is missing
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-00001-of-00002.safetensors"}}')
    with pytest.raises(UsageError, match="model-00001-of-00002.safetensors, listed in model.safetensors.index.json, "
                                         "is missing"):
        load_checkpoint(str(folder))


def test_unwrap_reaches_the_model_through_compile_and_data_parallel(tiny_model_dir):
    model = AutoModelForMaskedLM.from_pretrained(tiny_model_dir)
    assert unwrap(torch.compile(model)) is model
    assert unwrap(torch.nn.DataParallel(model)) is model  # same unwrapping as accelerate's for DDP/FSDP
    assert sparse_head_module(torch.nn.DataParallel(model)) is model.head


def test_partial_checkpoint_and_non_mlm_are_refused(tiny_model_dir, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(UsageError, match=r"checkpoint has no model.safetensors \(nor model.safetensors.index.json\): partial"):
        load_checkpoint(str(partial))
    gpt = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100).save_pretrained(gpt)
    with pytest.raises(UsageError, match="not a masked language model"):
        load_masked_lm(str(gpt))


def test_embeddings_grow_to_multiple_of_64_only_when_tokens_were_added():
    tok = train_tokenizer(texts=["one two three four five six seven"] * 50, vocab_size=260, num_unused=1)
    assert len(tok) > 260 - 64  # three chat tokens had to be added beyond the one reserved slot
    model = BertForMaskedLM(BertConfig(vocab_size=len(tok) - 3, hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32))
    resize_for_tokenizer(model, tok)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows >= len(tok) and rows - len(tok) < 64
    big = BertForMaskedLM(BertConfig(vocab_size=1024, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32))
    resize_for_tokenizer(big, tok)
    assert big.get_input_embeddings().weight.shape[0] == 1024


def test_from_scratch_sizes_and_hf_round_trip(tokenizer, tmp_path):
    model = build_from_scratch("tiny", tokenizer, max_position_embeddings=128)
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tokenizer)
    assert model.config.mask_token_id == tokenizer.mask_token_id
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == tokenizer.chat_template
    assert loaded.config.hidden_size == 128
    with pytest.raises(UsageError, match="--model_config"):
        build_from_scratch("huge", tokenizer)
