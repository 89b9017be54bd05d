"""The preparation scripts as users run them: exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from transformers import GPT2Config

from dlm.data.storage import PRETRAIN_FORMAT, SFT_FORMAT, load_prepared

PRETRAIN = ROOT / "prepare_pretrain_data.py"
SFT = ROOT / "prepare_sft_data.py"


def _run(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def _assert_usage_error(proc: subprocess.CompletedProcess, out: Path, *fragments: str) -> str:
    """Exit 2, exactly one `error:` line naming the problem, no traceback, and no output or leftovers."""
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert not leftovers, leftovers
    return errors[0]


@pytest.fixture()
def corpus(tmp_path, corpus_text) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(corpus_text)
    return path


def test_pretrain_script_writes_then_refuses_existing_folder(tmp_path, corpus, tokenizer, tokenizer_dir):
    out = tmp_path / "out"
    proc = _run(PRETRAIN, "--hf_model_name", tokenizer_dir, "--data_files", corpus, "--context_length", 64,
                "--path_to_data_store", out, "--test_split_pct", 0.05)
    assert proc.returncode == 0, proc.stderr
    data, meta = load_prepared(out, PRETRAIN_FORMAT, tokenizer)
    assert meta["context_length"] == 64 and len(data["train"]) == meta["splits"]["train"]["rows"] > 0
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    proc = _run(PRETRAIN, "--hf_model_name", tokenizer_dir, "--data_files", corpus, "--path_to_data_store", out)
    _assert_usage_error(proc, out, "--path_to_data_store", "already exists", "--overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_pretrain_missing_file_and_tiny_context(tmp_path, tokenizer_dir, corpus):
    out = tmp_path / "out"
    proc = _run(PRETRAIN, "--hf_model_name", tokenizer_dir, "--data_files", tmp_path / "nope.txt",
                "--path_to_data_store", out)
    _assert_usage_error(proc, out, "--data_files", "nope.txt", "no such file")
    proc = _run(PRETRAIN, "--hf_model_name", tokenizer_dir, "--data_files", corpus, "--context_length", 4,
                "--path_to_data_store", out)
    _assert_usage_error(proc, out, "--context_length 4 is too small")
    assert not out.exists()


def test_pretrain_malformed_jsonl_names_file_and_line(tmp_path, tokenizer_dir):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": "broken"\n')
    out = tmp_path / "out"
    proc = _run(PRETRAIN, "--hf_model_name", tokenizer_dir, "--data_files", path, "--path_to_data_store", out)
    _assert_usage_error(proc, out, "docs.jsonl line 4: malformed JSON")
    assert not out.exists()


def test_pretrain_missing_text_column_lists_columns(tmp_path, tokenizer_dir):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"content": "a", "id": 1}\n')
    out = tmp_path / "out"
    proc = _run(PRETRAIN, "--hf_model_name", tokenizer_dir, "--data_files", path, "--path_to_data_store", out)
    _assert_usage_error(proc, out, "--text_column", "'text'", "columns found: content, id")


def test_pretrain_empty_dataset(tmp_path, tokenizer_dir):
    path = tmp_path / "blank.txt"
    path.write_text("\n \n\n")
    out = tmp_path / "out"
    proc = _run(PRETRAIN, "--hf_model_name", tokenizer_dir, "--data_files", path, "--path_to_data_store", out)
    _assert_usage_error(proc, out, "--data_files", "empty")


def test_pretrain_refuses_non_masked_lm_and_tokenizer_without_mask(tmp_path, corpus):
    gpt = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100).save_pretrained(gpt)
    out = tmp_path / "out"
    proc = _run(PRETRAIN, "--hf_model_name", gpt, "--data_files", corpus, "--path_to_data_store", out)
    _assert_usage_error(proc, out, "--hf_model_name", "gpt2 is not a masked language model")
    from test_tokenization import _wordpiece_bert_tokenizer

    no_mask = tmp_path / "no_mask"
    _wordpiece_bert_tokenizer(corpus.read_text(), mask=False).save_pretrained(no_mask)
    proc = _run(SFT, "--hf_model_name", no_mask, "--data_files", _alpaca_file(tmp_path), "--path_to_data_store", out)
    _assert_usage_error(proc, out, "--hf_model_name", "no_mask", "no mask token")


def _alpaca_file(tmp_path: Path) -> Path:
    path = tmp_path / "alpaca.json"
    records = [{"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 2 else "numbers", "output": str(2 * i + 1)}
               for i in range(30)]
    path.write_text(json.dumps(records, indent=1))
    return path


def test_sft_script_writes_then_refuses_existing_folder(tmp_path, tokenizer, tokenizer_dir):
    out = tmp_path / "sft"
    proc = _run(SFT, "--hf_model_name", tokenizer_dir, "--data_files", _alpaca_file(tmp_path),
                "--path_to_data_store", out, "--context_length", 128, "--test_split_pct", 0.1)
    assert proc.returncode == 0, proc.stderr
    data, meta = load_prepared(out, SFT_FORMAT, tokenizer)
    assert meta["record_format"] == "alpaca" and (len(data["train"]), len(data["test"])) == (27, 3)
    assert set(data["train"].column_names) == {"input_ids", "answer_mask", "length"}
    proc = _run(SFT, "--hf_model_name", tokenizer_dir, "--data_files", _alpaca_file(tmp_path),
                "--path_to_data_store", out)
    _assert_usage_error(proc, out, "--path_to_data_store", "already exists")
    assert load_prepared(out, SFT_FORMAT)[1] == meta


def test_sft_malformed_json_and_missing_output_column(tmp_path, tokenizer_dir):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]\n')
    out = tmp_path / "sft"
    proc = _run(SFT, "--hf_model_name", tokenizer_dir, "--data_files", bad, "--path_to_data_store", out)
    _assert_usage_error(proc, out, "--data_files", "bad.json line 3: malformed JSON")
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{"instruction": "a", "input": ""}]))
    proc = _run(SFT, "--hf_model_name", tokenizer_dir, "--data_files", missing, "--path_to_data_store", out)
    _assert_usage_error(proc, out, "no column 'output'", "missing.json", "columns found: input, instruction")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    proc = _run(SFT, "--hf_model_name", tokenizer_dir, "--data_files", empty, "--path_to_data_store", out)
    _assert_usage_error(proc, out, "--data_files", "empty")
    assert not out.exists()


def test_every_flag_has_help_and_help_renders():
    import dataclasses

    from dlm.data.chat import SFTDataArguments
    from dlm.data.packing import PretrainDataArguments
    from dlm.errors import ArgumentParser
    from tokenizer import Arguments as TokenizerArguments

    for cls in (PretrainDataArguments, SFTDataArguments, TokenizerArguments):
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls)), cls
        text = ArgumentParser(cls).format_help()  # a stray % in a help string breaks --help
        assert "--hf_model_name" in text and "--model_name_or_path" in text
    reference = ("--test_split_pct 0.005 --context_length 1024 --path_to_data_store d --huggingface_cache_dir c "
                 "--dataset_split_seed 42 --num_workers 24 --hf_model_name answerdotai/ModernBERT-large "
                 "--large_dataset").split()
    (args,) = ArgumentParser(PretrainDataArguments).parse_args_into_dataclasses(reference)
    assert (args.large_dataset, args.num_workers, args.test_split_pct, args.huggingface_cache_dir) == (True, 24, 0.005, "c")
    (args,) = ArgumentParser(SFTDataArguments).parse_args_into_dataclasses(reference[:-1])
    assert (args.context_length, args.dataset_split_seed, args.path_to_data_store) == (1024, 42, "d")
