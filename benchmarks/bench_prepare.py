"""Throughput and peak memory of prepare_pretrain_data.py, against the naive pad-every-document approach.

    python benchmarks/bench_prepare.py                      # ~100 MB input, then 10x in --streaming mode
    python benchmarks/bench_prepare.py --size_mb 10 --stream_factor 3 --no_write   # a quick look

Input: ../shared/data/tinyshakespeare.txt (generated English-like text when absent) repeated to
--size_mb, cut into paragraph documents, tokenized by a byte-level BPE trained offline on it.
Runs, each a real subprocess of the script whose process tree's RSS is polled for its peak:
  1. --size_mb, 1 worker;  2. --size_mb, 2 workers;  3. --size_mb, --streaming, 2 workers;
  4. the same file listed --stream_factor times (a corpus that many times larger), --streaming, 2 workers.
Peak memory of 3 and 4 should be the same: streaming memory is bounded by one shard.
The naive baseline tokenizes each document alone and pads/truncates it to --context_length.
Figures are appended to benchmarks/RESULTS.md under "## Data preparation".

    python benchmarks/bench_prepare.py --huge_line_mb 10   # one document / one SFT record of 10 MB, no newline

measures instead peak memory and time of both scripts on a single huge line, against tokenizing it whole
(what they did before long documents were cut into pieces and huge SFT records were dropped untokenized),
alternating the runs; figures go under "## Data preparation: one huge line".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Data preparation"
HUGE_SECTION = "## Data preparation: one huge line"


def _seed_text() -> tuple[str, str]:
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text(encoding="utf-8"), "tinyshakespeare.txt"
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_corpus
    return make_corpus(1_000_000), "generated text (shared data absent)"


def _build_input(work: Path, size_mb: int) -> Path:
    text, _ = _seed_text()
    if not text.endswith("\n\n"):
        text = text.rstrip("\n") + "\n\n"  # so that repeats stay separate paragraphs
    path = work / f"corpus_{size_mb}mb.txt"
    target = size_mb << 20
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < target:
            f.write(text)
            written += len(text.encode())
    return path


def _pss(process: psutil.Process) -> int:
    """Proportional set size: forked workers share pages with their parent, which plain RSS would count
    once per process; PSS splits shared pages among the processes that map them."""
    try:
        return process.memory_full_info().pss
    except (AttributeError, psutil.AccessDenied):
        return process.memory_info().rss


def _anon_pss(process: psutil.Process) -> int:
    """Anonymous PSS (heap, arrays), without file-backed pages: reading memory-mapped Arrow files
    (the final save_to_disk pass) makes those resident, but they are reclaimable page cache."""
    try:
        with open(f"/proc/{process.pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss_Anon:"))
    except (OSError, StopIteration):
        return _pss(process)


def _peak_rss_run(cmd: list[str]) -> tuple[float, float, str]:
    """Run `cmd`; return (wall seconds, peak memory (PSS) of the whole process tree in MB, its stdout)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    peak = peak_anon = 0
    stderr_lines: list[str] = []
    stdout_lines: list[str] = []
    readers = [threading.Thread(target=lambda: stderr_lines.extend(proc.stderr), daemon=True),
               threading.Thread(target=lambda: stdout_lines.extend(proc.stdout), daemon=True)]
    for reader in readers:
        reader.start()
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(_pss(p) for p in tree if p.is_running()))
            peak_anon = max(peak_anon, sum(_anon_pss(p) for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    wall = time.perf_counter() - start
    for reader in readers:
        reader.join(timeout=5)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{''.join(stderr_lines[-20:])}")
    _peak_rss_run.last_anon_mb = peak_anon / 2**20
    return wall, peak / 2**20, "".join(stdout_lines)


def _prepare(work: Path, name: str, tok: Path, files: list[Path], context_length: int, workers: int,
             streaming: bool) -> dict:
    out = work / name
    cmd = [sys.executable, str(ROOT / "prepare_pretrain_data.py"), "--hf_model_name", str(tok),
           "--data_files", *map(str, files), "--path_to_data_store", str(out), "--context_length",
           str(context_length), "--num_workers", str(workers), "--test_split_pct", "0.005", "--overwrite"]
    if streaming:
        cmd.append("--streaming")
    wall, peak, _ = _peak_rss_run(cmd)
    meta = json.loads((out / "metadata.json").read_text())
    tokens = sum(s["source_tokens"] for s in meta["splits"].values())
    rows = sum(s["rows"] for s in meta["splits"].values())
    docs = sum(s["documents"] for s in meta["splits"].values())
    dropped = sum(s["dropped_tail_tokens"] for s in meta["splits"].values())
    input_mb = sum(f.stat().st_size for f in files) / 2**20
    shutil.rmtree(out)
    result = dict(name=name, input_mb=input_mb, workers=workers, streaming=streaming, wall_s=wall, peak_mb=peak,
                  peak_anon_mb=_peak_rss_run.last_anon_mb,
                  tokens=tokens, rows=rows, documents=docs, dropped=dropped, tokens_per_s=tokens / wall,
                  mb_per_s=input_mb / wall)
    print(json.dumps(result), flush=True)
    return result


def naive(tok: str, path: str, context_length: int) -> None:
    """Child mode: tokenize each document alone, pad/truncate to context_length; print counts as JSON."""
    from dlm.data.sources import iter_text_file
    from dlm.tokenization import load_tokenizer

    tokenizer = load_tokenizer(tok)
    docs = real = truncated = rows_bytes = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal docs, real, truncated, rows_bytes
        enc = tokenizer(batch, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        lengths = np.fromiter((len(x) + 1 for x in enc), dtype=np.int64)  # + EOS, as in packing
        padded = tokenizer.pad({"input_ids": [x[:context_length - 1] + [tokenizer.eos_token_id] for x in enc]},
                               padding="max_length", max_length=context_length, return_tensors="np")
        rows = padded["input_ids"].astype(np.uint16)
        docs += len(batch)
        real += int(np.minimum(lengths, context_length).sum())
        truncated += int(np.maximum(lengths - context_length, 0).sum())
        rows_bytes += rows.nbytes

    for doc in iter_text_file(Path(path)):
        batch.append(doc)
        if len(batch) == 2000:
            flush()
            batch = []
    if batch:
        flush()
    print(json.dumps(dict(documents=docs, real_tokens=real, truncated_tokens=truncated, stored_bytes=rows_bytes,
                          rows=docs)))


def _naive_run(tok: Path, path: Path, context_length: int) -> dict:
    cmd = [sys.executable, __file__, "--naive_child", str(tok), str(path), str(context_length)]
    wall, peak, stdout = _peak_rss_run(cmd)
    counts = json.loads(stdout.strip().splitlines()[-1])
    counts.update(wall_s=wall, peak_mb=peak, tokens_per_s=counts["real_tokens"] / wall)
    print(json.dumps(counts), flush=True)
    return counts


def _write_results(runs: list[dict], naive_counts: dict, args, seed_name: str, context_length: int) -> str:
    base, two, stream, big = runs
    packed_bytes = base["rows"] * context_length * 2
    lines = [
        SECTION, "",
        f"`python benchmarks/bench_prepare.py --size_mb {args.size_mb} --stream_factor {args.stream_factor}` "
        f"({time.strftime('%Y-%m-%d')}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
        f"**shared with three other engineers' jobs while it ran**, so absolute speeds are noisy and low; "
        f"compare rows with each other). Input: {seed_name} repeated to {base['input_mb']:.0f} MB, "
        f"{base['documents']:,} paragraph documents; byte-level BPE (vocab {args.vocab_size}, digits split) trained "
        f"offline on it; `--context_length {context_length}`; peak memory = summed PSS of the whole process tree (parent + tokenizer workers), polled every 0.1 s. With 1 worker the Rust tokenizer still batches over both cores (its own thread pool); with 2 workers each process tokenizes single-threaded.",
        "",
        "| run | input | workers | wall (s) | tokens/s | MB/s | peak memory (MB) | rows | tail tokens dropped |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        label = ("--streaming" if r["streaming"] else "default") + f" ({r['name']})"
        lines.append(f"| {label} | {r['input_mb']:.0f} MB | {r['workers']} | {r['wall_s']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['mb_per_s']:.2f} | {r['peak_mb']:.0f} | {r['rows']:,} | "
                     f"{r['dropped']:,} |")
    lines += [
        f"| naive: each document alone, padded/truncated to {context_length} | {base['input_mb']:.0f} MB | 1 | "
        f"{naive_counts['wall_s']:.1f} | {naive_counts['tokens_per_s']:,.0f} | "
        f"{base['input_mb'] / naive_counts['wall_s']:.2f} | {naive_counts['peak_mb']:.0f} | "
        f"{naive_counts['rows']:,} | {naive_counts['truncated_tokens']:,} (truncated) |",
        "",
        f"- Packing vs naive padding: the naive layout stores {naive_counts['rows']:,} rows "
        f"({naive_counts['stored_bytes'] / 2**20:,.0f} MB of uint16) for {naive_counts['real_tokens']:,} real tokens, "
        f"i.e. {100 * (1 - naive_counts['real_tokens'] / (naive_counts['rows'] * context_length)):.1f}% padding; "
        f"packing stores {base['rows']:,} rows ({packed_bytes / 2**20:,.0f} MB), "
        f"**{naive_counts['rows'] / max(base['rows'], 1):.1f}x fewer rows** (= {naive_counts['rows'] / max(base['rows'], 1):.1f}x "
        f"less compute per epoch at this length), with 0% padding and only {base['dropped']:,} tail tokens dropped.",
        f"- Workers: 2 workers vs 1: {two['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s "
        f"(with 1 worker the Rust tokenizer already batches over all cores; the cores were shared).",
        f"- Streaming memory: {stream['input_mb']:.0f} MB input -> peak {stream['peak_mb']:.0f} MB; "
        f"{big['input_mb']:.0f} MB input ({args.stream_factor}x) -> peak {big['peak_mb']:.0f} MB "
        f"(ratio {big['peak_mb'] / stream['peak_mb']:.2f}); anonymous memory only (heap and arrays, without "
        f"file-backed pages of the memory-mapped shards read by the final save): {stream['peak_anon_mb']:.0f} MB -> "
        f"{big['peak_anon_mb']:.0f} MB (ratio {big['peak_anon_mb'] / stream['peak_anon_mb']:.2f}; bounded by one "
        f"`--shard_mb` shard of text).",
        "",
    ]
    return "\n".join(lines)


def _append_section(text: str, section: str = SECTION) -> None:
    """Replace our section of RESULTS.md (or append it), leaving other sections as they are."""
    old = RESULTS.read_text() if RESULTS.is_file() else "# Benchmark results\n\n"
    start = old.find(section + "\n")
    if start >= 0:
        end = old.find("\n## ", start + len(section))
        old = old[:start] + (old[end + 1:] if end >= 0 else "")
    RESULTS.write_text(old.rstrip("\n") + "\n\n" + text)


def whole_child(tok: str, path: str) -> None:
    """Child mode: tokenize the file's one document whole, as a pretraining document (.txt) or as the rendered
    chat of the one SFT record (.json), the way both scripts did before; print the token count."""
    from dlm.data.chat import alpaca_to_messages
    from dlm.tokenization import encode_chat, load_tokenizer

    tokenizer = load_tokenizer(tok)
    if path.endswith(".json"):
        ids = encode_chat(tokenizer, alpaca_to_messages(json.loads(Path(path).read_text())[0]))
    else:
        ids = tokenizer(Path(path).read_text().strip(), add_special_tokens=False)["input_ids"]
    print(json.dumps({"tokens": len(ids)}))


def huge_line(work: Path, tok: Path, size_mb: float, context_length: int) -> str:
    """Peak memory and time of both scripts on one huge line, alternating with tokenizing it whole."""
    text, _ = _seed_text()
    line = " ".join(text.split())
    line = (line + " ") * (int(size_mb * 2**20) // len(line) + 1)
    line = line[: int(size_mb * 2**20)]
    txt, record = work / "huge.txt", work / "huge.json"
    txt.write_text(line + "\n")
    record.write_text(json.dumps([{"instruction": "Summarize.", "input": "", "output": line}] +
                                 [{"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)}
                                  for i in range(9)]))
    del line, text
    rows = []
    for script, path, label in (("prepare_pretrain_data.py", txt, "pretraining document"),
                                ("prepare_sft_data.py", record, "SFT record (--overlong drop)")):
        wall_whole, peak_whole, _ = _peak_rss_run([sys.executable, __file__, "--whole_child", str(tok), str(path)])
        out = work / f"out_{script}"
        wall, peak, _ = _peak_rss_run([sys.executable, str(ROOT / script), "--hf_model_name", str(tok),
                                       "--data_files", str(path), "--path_to_data_store", str(out),
                                       "--context_length", str(context_length), "--test_split_pct", "0",
                                       "--overwrite"])
        meta = json.loads((out / "metadata.json").read_text())
        rows.append(f"| {label} | {size_mb:g} MB | {wall_whole:.1f} | {peak_whole:,.0f} | {wall:.1f} | {peak:,.0f} | "
                    f"{meta['splits']['train']['rows']:,} rows |")
        print(rows[-1], flush=True)
    return "\n".join([
        HUGE_SECTION, "",
        f"`python benchmarks/bench_prepare.py --huge_line_mb {size_mb:g}` ({time.strftime('%Y-%m-%d')}; CPU, "
        f"{os.cpu_count()} cores shared with other jobs, so times are noisy; the two columns of a row ran one "
        f"after the other). One line of {size_mb:g} MB with no newline (the seed text's words); `--context_length "
        f"{context_length}`. \"Whole\" is a child that only tokenizes that text in one call, as both scripts did "
        f"before; the scripts now tokenize long documents in 128K-character pieces cut between words, and drop an "
        f"SFT record that is over-long by its character count before tokenizing it. Peak memory: PSS of the "
        f"process tree, polled every 0.1 s, including the interpreter and libraries (~300-400 MB).", "",
        "| input | size | whole: wall (s) | whole: peak (MB) | script: wall (s) | script: peak (MB) | kept |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |", *rows, ""])


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--naive_child":
        naive(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    if len(sys.argv) == 4 and sys.argv[1] == "--whole_child":
        whole_child(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size_mb", type=int, default=100, help="Size of the in-memory input (MB).")
    parser.add_argument("--stream_factor", type=int, default=10, help="How much larger the streamed corpus is.")
    parser.add_argument("--context_length", type=int, default=1024, help="Packed row length.")
    parser.add_argument("--vocab_size", type=int, default=8192, help="BPE vocabulary trained for the benchmark.")
    parser.add_argument("--work_dir", default=None, help="Scratch folder (default: a temporary one).")
    parser.add_argument("--no_write", action="store_true", help="Print the figures, do not touch RESULTS.md.")
    parser.add_argument("--huge_line_mb", type=float, default=None,
                        help="Instead: both scripts on one line of this many MB, against tokenizing it whole.")
    args = parser.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        from dlm.tokenization import train_tokenizer

        text, seed_name = _seed_text()
        tok = work / "tokenizer"
        if not tok.is_dir():
            train_tokenizer(texts=[text], vocab_size=args.vocab_size).save_pretrained(tok)
        if args.huge_line_mb:
            section = huge_line(work, tok, args.huge_line_mb, args.context_length)
            print(section)
            if not args.no_write:
                _append_section(section, HUGE_SECTION)
            return
        corpus = _build_input(work, args.size_mb)
        runs = [
            _prepare(work, "w1", tok, [corpus], args.context_length, 1, False),
            _prepare(work, "w2", tok, [corpus], args.context_length, 2, False),
            _prepare(work, "stream", tok, [corpus], args.context_length, 2, True),
            _prepare(work, f"stream_x{args.stream_factor}", tok, [corpus] * args.stream_factor,
                     args.context_length, 2, True),
        ]
        naive_counts = _naive_run(tok, corpus, args.context_length)
        section = _write_results(runs, naive_counts, args, seed_name, args.context_length)
        print(section)
        if not args.no_write:
            _append_section(section)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
