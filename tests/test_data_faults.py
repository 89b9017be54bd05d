"""Data preparation under hostile input and faults: concurrent writers, non-string fields, binary files, disk
full, what a killed run leaves behind, huge records. Each case ends in a correct dataset or one line."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
from conftest import ROOT

from dlm.data.chat import SFTDataArguments, prepare_sft
from dlm.data.packing import PIECE_CHARS, PretrainDataArguments, _encode_documents, prepare_pretrain
from dlm.data.storage import PRETRAIN_FORMAT, load_prepared
from dlm.errors import UsageError

PRETRAIN = ROOT / "prepare_pretrain_data.py"
SFT = ROOT / "prepare_sft_data.py"


def _pretrain(tmp_path, tokenizer_dir, files, **kw):
    return prepare_pretrain(PretrainDataArguments(
        path_to_data_store=str(tmp_path / kw.pop("name", "out")), hf_model_name=str(tokenizer_dir),
        data_files=[str(f) for f in files], **{"context_length": 16, "test_split_pct": 0.0, **kw}))


def _sft(tmp_path, tokenizer_dir, files, **kw):
    return prepare_sft(SFTDataArguments(
        path_to_data_store=str(tmp_path / kw.pop("name", "sft")), hf_model_name=str(tokenizer_dir),
        data_files=[str(f) for f in files], **{"context_length": 128, "test_split_pct": 0.0, **kw}))


def _leftovers(tmp_path, name="out") -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f".{name}"))


def _jsonl(path, records) -> object:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _run(script, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _lock_held(path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_second_writer_of_one_output_is_refused_and_the_first_one_is_intact(tmp_path, corpus_text, tokenizer_dir):
    """Two real processes: the script, frozen while it holds the output, and this test process writing the same
    folder with other arguments and with the same ones."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text[:10_000])
    out = tmp_path / "out"
    first = _run(PRETRAIN, "--hf_model_name", tokenizer_dir, "--data_files", corpus, "--path_to_data_store", out,
                 "--shard_mb", 0.001, "--context_length", 128)
    deadline = time.time() + 60
    while not _lock_held(tmp_path / ".out.lock"):  # the first run holds the output: freeze it there
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-2000:]
        time.sleep(0.01)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        for context_length in (64, 128):  # other arguments, then the very same ones
            with pytest.raises(UsageError, match=rf"--path_to_data_store {out}: another preparation run "
                                                 rf"\(pid {first.pid}\) is writing this folder"):
                _pretrain(tmp_path, tokenizer_dir, [corpus], shard_mb=0.001, context_length=context_length)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=180)
    assert first.returncode == 0, err
    data, meta = load_prepared(out, PRETRAIN_FORMAT)
    assert meta["context_length"] == 128 and len(data["train"]) == meta["splits"]["train"]["rows"]
    assert {len(r) for r in data["train"]["input_ids"]} == {128}
    assert _leftovers(tmp_path) == []


def test_non_string_texts_are_an_error_or_skipped_and_counted(tmp_path, tokenizer, tokenizer_dir):
    records = [{"text": "fine words"}, {"text": 42}, {"text": 3.14}, {"text": {"nested": {"a": [1, 2]}}},
               {"text": [1, "two"]}, {"text": None}, {"text": ""}, {"text": "more fine words"}]
    path = _jsonl(tmp_path / "docs.jsonl", records)
    with pytest.raises(UsageError, match=r"--data_files .*docs.jsonl line 2: field 'text' is number, not a string "
                                         r"\(pass --skip_bad_records"):
        _pretrain(tmp_path, tokenizer_dir, [path])
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    meta = _pretrain(tmp_path, tokenizer_dir, [path], skip_bad_records=True, context_length=8)
    assert meta["skipped_records"] == {"number": 2, "object": 1, "list": 1, "null": 1}
    train = meta["splits"]["train"]
    assert (train["documents"], train["empty_documents"]) == (2, 1) and meta["records"] == len(records)
    data, _ = load_prepared(tmp_path / "out", PRETRAIN_FORMAT)
    text = tokenizer.decode(np.concatenate(data["train"]["input_ids"]))
    assert "fine words" in text and "42" not in text and "nested" not in text and "two" not in text
    # --text_column naming a list field, and a parquet file with a null: the same one-line error
    lists = _jsonl(tmp_path / "lists.jsonl", [{"output": "a"}, {"output": ["a", "b"]}])
    with pytest.raises(UsageError, match=r"lists.jsonl line 2: field 'output' is list"):
        _pretrain(tmp_path, tokenizer_dir, [lists], text_column="output", name="other")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a b c", None]}), tmp_path / "docs.parquet")
    with pytest.raises(UsageError, match=r"docs.parquet record 1: field 'text' is null"):
        _pretrain(tmp_path, tokenizer_dir, [tmp_path / "docs.parquet"], name="other")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_binary_file_under_a_text_name_is_one_line_in_both_scripts(tmp_path, tokenizer_dir, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(b'{"text": "ok"}\n' + bytes(range(128, 256)) * 40 + b"\x00\x01")
    with pytest.raises(UsageError, match=rf"--data_files .*data{suffix}: not UTF-8 text .*binary file"):
        _pretrain(tmp_path, tokenizer_dir, [path])
    with pytest.raises(UsageError, match=rf"--data_files .*data{suffix}: not UTF-8 text .*binary file"):
        _sft(tmp_path, tokenizer_dir, [path])
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path, "sft") == []


def test_csv_rows_with_missing_or_extra_fields_name_the_line(tmp_path, tokenizer_dir):
    path = tmp_path / "docs.csv"
    path.write_text('text,id\n"a, quoted\nline",1\nb,2,surplus\n')
    with pytest.raises(UsageError, match=r"docs.csv line 4: 3 fields, the header has 2"):
        _pretrain(tmp_path, tokenizer_dir, [path])
    path.write_text("text,id\na,1\nb\n")
    with pytest.raises(UsageError, match=r"docs.csv line 3: 1 fields, the header has 2"):
        _pretrain(tmp_path, tokenizer_dir, [path])


def test_alpaca_fields_of_other_types_are_an_error_or_skipped(tmp_path, tokenizer_dir):
    good = [{"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)} for i in range(6)]
    bad = [{"instruction": "a", "input": "", "output": 42}, {"instruction": {"x": 1}, "input": "", "output": "b"},
           {"instruction": "a", "input": ["l"], "output": "b"}, {"instruction": None, "input": "", "output": "b"},
           {"instruction": "a", "input": None, "output": "b"}]  # a null input is a record without input
    path = _jsonl(tmp_path / "alpaca.jsonl", good[:3] + bad + good[3:])
    with pytest.raises(UsageError, match=r"alpaca.jsonl line 4: field 'output' is number, not a string"):
        _sft(tmp_path, tokenizer_dir, [path])
    meta = _sft(tmp_path, tokenizer_dir, [path], skip_bad_records=True)
    assert meta["skipped_records"] == {"field 'output' is number, not a string": 1,
                                       "field 'instruction' is object, not a string": 1,
                                       "field 'input' is list, not a string": 1,
                                       "field 'instruction' is null, not a string": 1}
    assert meta["records"] == 11 and meta["splits"]["train"]["rows"] == 7
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                                  "content": None}]}]))
    with pytest.raises(UsageError, match=r"chat.json record 0: messages\[1\].content is null, not a string"):
        _sft(tmp_path, tokenizer_dir, [chat], name="chat")


@contextlib.contextmanager
def _file_size_limit(limit: int):
    """RLIMIT_FSIZE for this process: writes past `limit` bytes fail with EFBIG (SIGXFSZ ignored), as on a full
    disk; works unprivileged, unlike mounting a small tmpfs."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)


def test_disk_full_names_what_was_being_written_and_leaves_nothing_half_written(tmp_path, corpus_text,
                                                                                 tokenizer_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text[:12_000])
    with _file_size_limit(4096), pytest.raises(UsageError, match=r"disk full while writing a shard to "
                                                                 r".*/\.out\.shards \(File too large\); about"):
        _pretrain(tmp_path, tokenizer_dir, [corpus], shard_mb=0.1)
    # small shards fit, the single file of the final dataset does not: the finished shards are kept
    _pretrain(tmp_path, tokenizer_dir, [corpus], shard_mb=0.001, name="probe")
    final_file = max(f.stat().st_size for f in (tmp_path / "probe").rglob("*.arrow"))  # this corpus's, not a guess
    with _file_size_limit(final_file - 1), pytest.raises(UsageError, match=r"writing .*/out failed at train/.*\.arrow: "
                                                                       r"File too large.*, a complete one takes about "
                                                                       r"[0-9.]+ [KMG]?B"):
        _pretrain(tmp_path, tokenizer_dir, [corpus], shard_mb=0.001)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == [".out.shards"]
    assert _pretrain(tmp_path, tokenizer_dir, [corpus], shard_mb=0.001)["splits"]["train"]["rows"] > 0
    records = [{"instruction": "Say it. " * 20, "input": "", "output": f"{i} " * 30} for i in range(30)]
    path = _jsonl(tmp_path / "alpaca.jsonl", records)
    with _file_size_limit(8192), pytest.raises(UsageError, match=r"writing .*/sft failed at .*: File too large.*"
                                                                 r"a complete one takes about"):
        _sft(tmp_path, tokenizer_dir, [path], context_length=512)
    assert not (tmp_path / "sft").exists() and _leftovers(tmp_path, "sft") == []


def test_leftovers_of_a_killed_run_are_removed_by_the_next_run(tmp_path, corpus_text, tokenizer_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text[:5000])
    orphan = tmp_path / ".out.tmp-k1ll3d"  # a run SIGKILLed while writing its final output leaves this
    (orphan / "train").mkdir(parents=True)
    (orphan / "train" / "data-00000-of-00001.arrow").write_bytes(b"half")
    _pretrain(tmp_path, tokenizer_dir, [corpus])
    assert _leftovers(tmp_path) == [] and load_prepared(tmp_path / "out", PRETRAIN_FORMAT)[1]["splits"]
    # killed between moving the previous output aside (--overwrite) and renaming the new one into place:
    # the previous output is the only complete copy, and is put back
    (tmp_path / "out").rename(tmp_path / ".out.old-4242")
    with pytest.raises(UsageError, match="already exists"):
        _pretrain(tmp_path, tokenizer_dir, [corpus])
    assert _leftovers(tmp_path) == [] and load_prepared(tmp_path / "out", PRETRAIN_FORMAT)[1]["splits"]


class _PeakRSS:
    """Peak resident memory of this process above its level at entry, polled every 5 ms."""

    def __enter__(self):
        self.proc, self.stop = psutil.Process(), False
        self.base = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.mb = (self.peak - self.base) / 2**20


def test_huge_documents_are_tokenized_in_pieces_and_huge_sft_records_dropped_untokenized(tmp_path, tokenizer,
                                                                                         tokenizer_dir):
    import datasets  # noqa: F401  (imported before measuring: its import alone is ~100 MB)

    words = "the sea and 12 wind of kings,  queens;\n347 bread! ".split(" ")
    line = " ".join(words[i % len(words)] for i in range(2_000_000 // 5))  # ~1 MB, no blank line
    doc = line[: PIECE_CHARS + 999]  # two pieces
    ids, empty = _encode_documents([doc], tokenizer)  # only long documents: no batch of short ones
    whole = tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert empty == 0 and ids[:len(whole)].tolist() == whole  # pieces give the whole document's tokens
    (tmp_path / "big.txt").write_text("a short one\n\n" + line + "\n")
    with _PeakRSS() as pretrain_memory:
        meta = _pretrain(tmp_path, tokenizer_dir, [tmp_path / "big.txt"], context_length=64)
    assert meta["splits"]["train"]["documents"] == 2
    big = _jsonl(tmp_path / "big.jsonl", [{"instruction": "a", "input": "", "output": line[:3_000_000]}] +
                 [{"instruction": f"q{i}", "input": "", "output": "b"} for i in range(4)])
    with _PeakRSS() as sft_memory:
        meta = _sft(tmp_path, tokenizer_dir, [big], context_length=64)
    assert meta["overlong"]["dropped"] == 1 and meta["splits"]["train"]["rows"] == 4
    prompt = _jsonl(tmp_path / "prompt.jsonl", [{"instruction": line[:500_000], "input": "", "output": "b"}] +
                    [{"instruction": f"q{i}", "input": "", "output": "b"} for i in range(4)])
    meta = _sft(tmp_path, tokenizer_dir, [prompt], context_length=64, overlong="truncate", name="cut")
    assert meta["overlong"] == {"policy": "truncate", "dropped": 1, "truncated": 0}  # its prompt alone fills it
    # before: 251 MB and 227 MB (the whole 1 MB text through the tokenizer at once)
    assert pretrain_memory.mb < 120 and sft_memory.mb < 60, (pretrain_memory.mb, sft_memory.mb)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("deep.jsonl", '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n", r"deep.jsonl line 1: JSON nested too deeply"),
    ("deep.json", '[{"text": ' + "[" * 100_000 + "]" * 100_000 + "}]", r"deep.json: JSON nested too deeply"),
    ("lone.jsonl", '{"text": "fine"}\n{"text": "a \\ud800 b"}\n', r"lone.jsonl line 2: a \\u escape of a lone UTF-16"),
    ("alpaca.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', r"line 2: field 'output' is missing"),
    ("chat.jsonl", json.dumps({"messages": [{"role": "bot", "content": "x"}]}), r"messages\[0\].role is 'bot', not one"),
])
def test_json_that_parses_but_cannot_be_text_is_one_line(tmp_path, tokenizer_dir, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    prepare = _sft if name.startswith(("alpaca", "chat")) else _pretrain
    with pytest.raises(UsageError, match=message):
        prepare(tmp_path, tokenizer_dir, [path])


def test_byte_order_marks_are_not_text(tmp_path, tokenizer, tokenizer_dir):
    for name, content in [("bom.jsonl", '{"text": "hello there sea"}\n'), ("bom.csv", "text\nhello there sea\n"),
                          ("bom.txt", "hello there sea\n")]:
        (tmp_path / name).write_text(content, encoding="utf-8-sig")
        _pretrain(tmp_path, tokenizer_dir, [tmp_path / name], context_length=8, name=name[4:])
        data, _ = load_prepared(tmp_path / name[4:], PRETRAIN_FORMAT)
        assert tokenizer.decode(data["train"][0]["input_ids"]).startswith("hello there sea")


def test_a_stray_shard_in_the_work_folder_is_not_part_of_the_dataset(tmp_path, corpus_text, tokenizer_dir,
                                                                      caplog):
    docs = [json.dumps({"text": t}) for t in corpus_text[:6000].split("\n")]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(docs[:-1] + [docs[-1][:-1] + "x"]) + "\n")  # dies at the end, shards kept
    stamp = os.stat(path).st_mtime_ns
    with pytest.raises(UsageError, match="malformed JSON"):
        _pretrain(tmp_path, tokenizer_dir, [path], streaming=True, shard_mb=0.001)
    work = tmp_path / ".out.shards"
    (work / "shard-09999-train.arrow").write_bytes((work / "shard-00000-train.arrow").read_bytes())
    path.write_text("\n".join(docs) + "\n")  # repaired: same size and time, so the run resumes
    os.utime(path, ns=(stamp, stamp))
    with caplog.at_level(logging.INFO, logger="dlm.data.packing"):
        meta = _pretrain(tmp_path, tokenizer_dir, [path], streaming=True, shard_mb=0.001)
    assert "resuming" in caplog.text
    clean = _pretrain(tmp_path, tokenizer_dir, [path], streaming=True, shard_mb=0.001, name="clean")
    data, _ = load_prepared(tmp_path / "out", PRETRAIN_FORMAT)
    assert len(data["train"]) == meta["splits"]["train"]["rows"] == clean["splits"]["train"]["rows"]


def test_a_really_full_disk_is_one_line_too(tmp_path, tokenizer_dir):
    """ENOSPC from a real 32 KB tmpfs (needs root, as in CI containers here; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        records = [{"instruction": "Say it. " * 20, "input": "", "output": f"{i} " * 30} for i in range(60)]
        path = _jsonl(tmp_path / "alpaca.jsonl", records)
        with pytest.raises(UsageError, match=r"writing .*/disk/sft failed at .*: No space left on device; .* free "
                                             r"on that disk, a complete one takes about [0-9.]+ [KMG]?B"):
            _sft(disk, tokenizer_dir, [path], context_length=512)
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)
