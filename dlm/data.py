"""Loading sources, tokenizing, packing, answer masks, collators.

Prepared-data contract (what training reads): a `DatasetDict.save_to_disk` folder with
`train` and `test` splits and a `metadata.json` beside `dataset_dict.json`.
  * pretraining rows: `input_ids`, all exactly `context_length` long (packed, EOS-separated);
  * SFT rows: `input_ids` (a rendered chat), `answer_mask` (1 on assistant tokens and their
    end-of-turn), `length`.

`metadata.json` (written last, atomically, by the preparation scripts):
  {"format": "dlm-pretrain" | "dlm-sft", "tokenizer": <name or path>, "tokenizer_fingerprint": <hash>,
   "vocab_size": len(tokenizer), "special_ids": {mask, pad, bos, eos, eot, system, user, assistant},
   "context_length": <row length (pretrain) or max length (sft)>, "dtype": <input_ids storage type>,
   "splits": {"train": {"rows": n, "tokens": n, ...}, "test": {...}}, "sources": [...], "seed": n, ...}
  Extra keys written by the tools: pretraining splits also hold `documents`, `empty_documents`,
  `source_tokens` (document tokens + one EOS each) and `dropped_tail_tokens` (the final partial row,
  so source_tokens == tokens + dropped_tail_tokens); SFT splits hold `answer_tokens` and `max_length`,
  and SFT metadata has `record_format` and `overlong: {policy, dropped, truncated}`.

Entry points: `prepare_pretrain(PretrainDataArguments)` and `prepare_sft(SFTDataArguments)` (the
scripts are thin wrappers), and for building prompts identical to training ones:
`alpaca_to_messages`, `record_to_messages`, `records_to_messages`, `detect_format`, `encode_sft_batch`.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dlm.cli import UsageError

logger = logging.getLogger(__name__)

PRETRAIN_FORMAT = "dlm-pretrain"
SFT_FORMAT = "dlm-sft"
METADATA_FILE = "metadata.json"


def load_prepared(path: str | Path, expected_format: str, tokenizer=None,
                  flag: str = "--path_to_prepped_data") -> tuple[Any, dict]:
    """Open a prepared `DatasetDict` folder (memory-mapped) and its metadata, checking that it fits.

    Raises `UsageError` when the folder is missing or not prepared data, when it holds the other
    kind of data (pretraining vs SFT), or when it was tokenized with a different tokenizer than
    `tokenizer` (compared by `tokenizer_fingerprint`).
    """
    from datasets import load_from_disk

    from dlm.tokenization import tokenizer_fingerprint

    folder = Path(path)
    meta_path = folder / METADATA_FILE
    if not folder.is_dir():
        raise UsageError(f"{flag} {folder}: no such folder (prepare it with prepare_pretrain_data.py "
                         f"or prepare_sft_data.py)")
    if not meta_path.is_file() or not (folder / "dataset_dict.json").is_file():
        raise UsageError(f"{flag} {folder}: not a prepared dataset (no {METADATA_FILE} / dataset_dict.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{flag} {meta_path}: malformed JSON ({err})") from None
    if meta.get("format") != expected_format:
        raise UsageError(f"{flag} {folder} holds {meta.get('format')!r} data, expected {expected_format!r}")
    if tokenizer is not None and meta.get("tokenizer_fingerprint") != tokenizer_fingerprint(tokenizer):
        raise UsageError(f"{flag} {folder} was prepared with another tokenizer ({meta.get('tokenizer')}); "
                         f"prepare it again with this model's tokenizer")
    return load_from_disk(str(folder)), meta


def save_prepared(dataset, metadata: dict, out: str | Path, overwrite: bool) -> None:
    """Write a prepared `DatasetDict` and its metadata.json atomically (metadata last).

    An empty split (a tiny corpus with a 0.5% test split, or --test_split_pct 0) is written as one
    empty Arrow file: `datasets` saves it with no file at all, which `load_from_disk` cannot read.
    """
    from dlm.cli import atomic_output_dir, atomic_write_text

    for split, ds in dataset.items():
        if len(ds) == 0:
            logger.warning("the %s split is empty", split)
    with atomic_output_dir(out, "--path_to_data_store", overwrite) as tmp:
        dataset.save_to_disk(str(tmp), num_shards={k: 1 if len(v) == 0 else None for k, v in dataset.items()})
        atomic_write_text(tmp / METADATA_FILE, json.dumps(metadata, indent=2))


class PretrainCollator:
    """Stack packed rows (all the same length) into a LongTensor batch."""

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        import torch

        return {"input_ids": torch.as_tensor([f["input_ids"] for f in features], dtype=torch.long)}


class SFTCollator:
    """Pad SFT rows to the longest in the batch with EOS; padding counts as answer.

    The model must learn to fill the tail of the canvas with EOS after the answer, which is
    exactly what sampling asks of it, so pads are answer tokens, attended to like any other.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 8):
        self.pad_id = pad_id
        self.multiple = pad_to_multiple_of

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        width = -(-longest // self.multiple) * self.multiple
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        answer = torch.ones((len(features), width), dtype=torch.bool)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            answer[row, :n] = torch.as_tensor(f["answer_mask"], dtype=torch.bool)
        return {"input_ids": ids, "answer_mask": answer}


# ----------------------------------------------------------------------------------------------
# Reading local files (shared by both preparation tools)
# ----------------------------------------------------------------------------------------------


TEXT_EXTENSIONS = (".txt",)
RECORD_EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv")


def expand_data_files(patterns: Sequence[str], flag: str = "--data_files",
                      allowed: Sequence[str] = TEXT_EXTENSIONS + RECORD_EXTENSIONS) -> list[Path]:
    """Resolve files and globs (sorted within each glob), checking each is a readable file of a known type."""
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(_glob.glob(pattern, recursive=True)) if _glob.has_magic(pattern) else [pattern]
        if not matches:
            raise UsageError(f"{flag} {pattern}: no file matches this pattern")
        for match in matches:
            path = Path(match)
            if not path.is_file():
                raise UsageError(f"{flag} {path}: no such file")
            if not os.access(path, os.R_OK):
                raise UsageError(f"{flag} {path}: file is not readable")
            if path.suffix.lower() not in allowed:
                raise UsageError(f"{flag} {path}: unsupported file type {path.suffix!r} "
                                 f"(supported: {', '.join(allowed)})")
            paths.append(path)
    return paths


def iter_local_records(path: Path, flag: str = "--data_files") -> Iterator[dict]:
    """Records of a .json (list of objects, or JSON lines), .jsonl, .csv or .parquet file, read lazily.

    Malformed JSON is reported with the file and line, as a `UsageError`.
    """
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                yield from batch.to_pylist()
        except Exception as err:  # pyarrow raises several types for damaged files
            raise UsageError(f"{flag} {path}: cannot read parquet ({str(err).splitlines()[0]})") from None
    elif suffix == ".csv":
        import csv
        with open(path, newline="", encoding="utf-8") as f:
            yield from csv.DictReader(f)
    elif suffix == ".jsonl":
        yield from _iter_json_lines(path, flag)
    elif suffix == ".json":
        text = _read_text(path, flag)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg == "Extra data":  # several documents: a JSON-lines file named .json
                yield from _iter_json_lines(path, flag)
                return
            raise UsageError(f"{flag} {path} line {err.lineno}: malformed JSON ({err.msg})") from None
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(data) == 1 and lists else [data]
        if not isinstance(data, list):
            raise UsageError(f"{flag} {path}: expected a list of objects, got {type(data).__name__}")
        for i, record in enumerate(data):
            if not isinstance(record, dict):
                raise UsageError(f"{flag} {path}: record {i} is a {type(record).__name__}, not an object")
            yield record
    else:
        raise UsageError(f"{flag} {path}: not a record file (.json, .jsonl, .csv, .parquet)")


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{flag} {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot read ({err.strerror})") from None


def _iter_json_lines(path: Path, flag: str) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"{flag} {path} line {lineno}: malformed JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise UsageError(f"{flag} {path} line {lineno}: expected a JSON object, "
                                 f"got {type(record).__name__}")
            yield record


def iter_text_file(path: Path, split_by: str = "paragraph") -> Iterator[str]:
    """Documents of a plain-text file: blank-line separated paragraphs, single lines, or the whole file.

    Paragraphs are read line by line, so a file larger than memory streams.
    """
    if split_by == "file":
        yield path.read_text(encoding="utf-8")
        return
    with open(path, encoding="utf-8") as f:
        if split_by == "line":
            for line in f:
                line = line.rstrip("\n")
                if line.strip():
                    yield line
            return
        paragraph: list[str] = []
        for line in f:
            if line.strip():
                paragraph.append(line.rstrip("\n"))
            elif paragraph:
                yield "\n".join(paragraph)
                paragraph = []
        if paragraph:
            yield "\n".join(paragraph)


def _columns_error(flag: str, where: str, missing: str, columns: Iterable[str], what: str = "") -> UsageError:
    found = ", ".join(sorted(columns)) or "none"
    return UsageError(f"{flag}: no column {missing!r}{what} in {where} (columns found: {found})")


def iter_local_texts(paths: Sequence[Path], text_column: str = "text", split_by: str = "paragraph",
                     flag: str = "--data_files") -> Iterator[str]:
    """Documents of local files, in file order: text files by `split_by`, record files by `text_column`."""
    for path in paths:
        if path.suffix.lower() in TEXT_EXTENSIONS:
            try:
                yield from iter_text_file(path, split_by)
            except UnicodeDecodeError as err:
                raise UsageError(f"{flag} {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
            continue
        for i, record in enumerate(iter_local_records(path, flag)):
            if text_column not in record:
                raise _columns_error("--text_column", f"{path} (record {i})", text_column, record)
            text = record[text_column]
            if text is not None:
                yield str(text)


# ----------------------------------------------------------------------------------------------
# Pretraining data: documents -> EOS-separated token stream -> rows of exactly context_length
# ----------------------------------------------------------------------------------------------

DEFAULT_PRETRAIN_DATASET = "manu/project_gutenberg"
DEFAULT_PRETRAIN_SPLIT = "en"
LARGE_DATASETS = ("HuggingFaceFW/fineweb:sample-10BT", "HuggingFaceFW/fineweb-edu:sample-10BT",
                  "wikimedia/wikipedia:20231101.en")
MIN_CONTEXT_LENGTH = 8


@dataclass
class PretrainDataArguments:
    """Flags of prepare_pretrain_data.py (reference recipe names first, Hugging Face names as aliases)."""

    path_to_data_store: str = field(metadata={
        "help": "Output folder: a DatasetDict (train/test) plus metadata.json, written atomically.",
        "aliases": ["--output_dir"]})
    hf_model_name: str = field(default="answerdotai/ModernBERT-large", metadata={
        "help": "Hub id or local folder of the masked LM (or tokenizer) whose tokenizer is used.",
        "aliases": ["--model_name_or_path", "--tokenizer_name"]})
    context_length: int = field(default=1024, metadata={
        "help": "Length of every packed row, in tokens.", "aliases": ["--max_seq_length"]})
    large_dataset: bool = field(default=False, metadata={
        "help": "Use FineWeb sample-10BT + FineWeb-Edu sample-10BT + Wikipedia 20231101.en "
                "instead of the default Gutenberg corpus."})
    dataset: list[str] | None = field(default=None, metadata={
        "help": "Hub dataset(s) as NAME or NAME:CONFIG (instead of the default Gutenberg corpus).",
        "aliases": ["--dataset_name"]})
    dataset_split: str | None = field(default=None, metadata={
        "help": "Split of the hub dataset(s) to read (default: train; 'en' for Gutenberg)."})
    data_files: list[str] | None = field(default=None, metadata={
        "help": "Local .txt/.jsonl/.json/.parquet/.csv files or globs (instead of a hub dataset)."})
    text_column: str = field(default="text", metadata={"help": "Column holding the document text."})
    txt_split_by: str = field(default="paragraph", metadata={
        "help": "How a .txt file is cut into documents: paragraph (blank lines), line or file.",
        "choices": ["paragraph", "line", "file"]})
    test_split_pct: float = field(default=0.005, metadata={
        "help": "Fraction of documents held out for the test split (0.005 = 0.5%%), chosen before packing."})
    dataset_split_seed: int = field(default=42, metadata={
        "help": "Seed of the train/test document split.", "aliases": ["--seed"]})
    num_workers: int = field(default=1, metadata={
        "help": "Tokenizer processes.", "aliases": ["--preprocessing_num_workers"]})
    huggingface_cache_dir: str | None = field(default=None, metadata={
        "help": "Cache folder for hub downloads.", "aliases": ["--cache_dir"]})
    streaming: bool = field(default=False, metadata={
        "help": "Stream the sources instead of downloading them whole (corpora larger than RAM or disk); "
                "the test split is then drawn per document with probability --test_split_pct."})
    shard_mb: float = field(default=64, metadata={
        "help": "Text per shard (MB): memory is bounded by one shard; finished shards are kept so that a "
                "rerun after an interruption resumes."})
    max_documents: int | None = field(default=None, metadata={"help": "Stop after this many documents."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --path_to_data_store."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom code from the hub."})


def pack_rows(carry: np.ndarray, ids: np.ndarray, context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Append `ids` to the leftover `carry` and cut full rows: (rows [n, context_length], new carry)."""
    stream = np.concatenate([carry, ids]) if len(carry) else ids
    n = len(stream) // context_length
    return stream[: n * context_length].reshape(n, context_length), stream[n * context_length:]


_WORKER_TOKENIZER = None


def _init_worker(tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode_documents(texts: list[str], tokenizer=None) -> tuple[np.ndarray, int]:
    """Token ids of documents, each followed by EOS, as one int32 array; documents with no token are skipped."""
    tokenizer = tokenizer or _WORKER_TOKENIZER
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"]
    eos = tokenizer.eos_token_id
    kept = [ids for ids in encoded if ids]
    lengths = np.fromiter((len(ids) + 1 for ids in kept), dtype=np.int64, count=len(kept))
    flat = np.empty(int(lengths.sum()), dtype=np.int32)
    flat[:] = eos  # the position after each document keeps the EOS
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    if kept:
        flat_docs = np.fromiter(itertools.chain.from_iterable(kept), dtype=np.int32)
        doc_positions = np.repeat(starts, lengths - 1) + _ranges(lengths - 1)
        flat[doc_positions] = flat_docs
    return flat, len(texts) - len(kept)


def _ranges(lengths: np.ndarray) -> np.ndarray:
    """Concatenated aranges: [0..l0-1, 0..l1-1, ...], without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(total, dtype=np.int64) - offsets


class DocumentEncoder:
    """Tokenize batches of documents into one EOS-separated id stream, in `num_workers` processes.

    Work is cut into chunks of about `chunk_chars` characters so that Python lists from the
    tokenizer stay small and workers stay busy; order is preserved.
    """

    def __init__(self, tokenizer, num_workers: int = 1, chunk_chars: int = 1 << 20):
        self.tokenizer = tokenizer
        self.chunk_chars = chunk_chars
        self.pool = None
        if num_workers > 1:
            import multiprocessing
            # Workers tokenize; the fast tokenizer's own thread pool would fight them for cores.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            self.pool = multiprocessing.get_context("fork").Pool(num_workers, _init_worker, (tokenizer,))

    def _chunks(self, texts: list[str]) -> Iterator[list[str]]:
        chunk, size = [], 0
        for text in texts:
            chunk.append(text)
            size += len(text)
            if size >= self.chunk_chars:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk

    def encode(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """(ids of all documents, each followed by EOS; number of documents that were empty)."""
        if self.pool is not None:
            parts = self.pool.imap(_encode_documents, self._chunks(texts))
        else:
            parts = (_encode_documents(c, self.tokenizer) for c in self._chunks(texts))
        arrays, empty = [], 0
        for ids, n_empty in parts:
            arrays.append(ids)
            empty += n_empty
        return (np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)), empty

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None


def _split_name(spec: str) -> tuple[str, str | None]:
    """'NAME:CONFIG' -> (NAME, CONFIG); a bare name has no config."""
    name, _, config = spec.partition(":")
    return name, config or None


class _PretrainSource:
    """The documents of one named source (a hub dataset or local files), iterated lazily."""

    def __init__(self, label: str, iterate, length: int | None = None):
        self.label, self._iterate, self.length = label, iterate, length

    def __iter__(self) -> Iterator[str]:
        return self._iterate()


def _hub_text_source(spec: str, split: str, args: PretrainDataArguments) -> _PretrainSource:
    from datasets import load_dataset

    name, config = _split_name(spec)
    try:
        ds = load_dataset(name, config, split=split, streaming=args.streaming, cache_dir=args.huggingface_cache_dir)
    except Exception as err:  # datasets raises many types (connection, missing config, missing split)
        raise UsageError(f"--dataset {spec}: cannot load split {split!r} ({str(err).splitlines()[0]})") from None
    column = args.text_column
    columns = getattr(ds, "column_names", None)
    if columns is not None and column not in columns:
        raise _columns_error("--text_column", spec, column, columns)
    if args.streaming:
        def iterate() -> Iterator[str]:
            for example in ds:
                if column not in example:
                    raise _columns_error("--text_column", spec, column, example)
                if example[column] is not None:
                    yield example[column]
        return _PretrainSource(spec, iterate)

    def iterate_arrow() -> Iterator[str]:
        for batch in ds.select_columns([column]).iter(batch_size=1000):
            yield from (t for t in batch[column] if t is not None)
    return _PretrainSource(spec, iterate_arrow, len(ds))


def _pretrain_sources(args: PretrainDataArguments) -> list[_PretrainSource]:
    if args.data_files:
        paths = expand_data_files(args.data_files)

        def iterate() -> Iterator[str]:
            return iter_local_texts(paths, args.text_column, args.txt_split_by)
        source = _PretrainSource(",".join(str(p) for p in paths), iterate)
        source.paths = paths
        if not args.streaming:  # the exact split needs the count: one cheap pass over the files
            source.length = sum(1 for _ in iterate())
            if source.length == 0:
                raise UsageError(f"--data_files {source.label}: the dataset is empty (no documents)")
        return [source]
    if args.large_dataset:
        return [_hub_text_source(spec, args.dataset_split or "train", args) for spec in LARGE_DATASETS]
    if args.dataset:
        return [_hub_text_source(spec, args.dataset_split or "train", args) for spec in args.dataset]
    return [_hub_text_source(DEFAULT_PRETRAIN_DATASET, args.dataset_split or DEFAULT_PRETRAIN_SPLIT, args)]


def _iter_shards(docs: Iterator[str], shard_chars: int) -> Iterator[list[str]]:
    """Consecutive groups of documents holding about `shard_chars` characters each (deterministic)."""
    shard, size = [], 0
    for doc in docs:
        shard.append(doc)
        size += len(doc)
        if size >= shard_chars:
            yield shard
            shard, size = [], 0
    if shard:
        yield shard


def _write_rows(path: Path, rows: np.ndarray) -> None:
    """Write rows [n, L] as an Arrow stream file with one list<uint*> column `input_ids`."""
    import pyarrow as pa

    n, length = rows.shape
    offsets = pa.array(np.arange(0, n * length + 1, length, dtype=np.int32))
    table = pa.table({"input_ids": pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1)))})
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=max(1, (1 << 24) // max(length, 1)))
    tmp.replace(path)


def _split_dataset(paths: list[Path], dtype: str):
    """A memory-mapped Dataset over the shard files of one split (an empty typed one if none)."""
    from datasets import Dataset, Features, List, Value, concatenate_datasets

    if not paths:
        return Dataset.from_dict({"input_ids": []}, features=Features({"input_ids": List(Value(dtype))}))
    parts = [Dataset.from_file(str(p)) for p in paths]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _test_assignment(n_docs: int, pct: float, seed: int) -> np.ndarray:
    """Exact seeded split: round(n * pct) documents (at least one when pct > 0 and n > 1) go to test."""
    n_test = int(round(n_docs * pct))
    if pct > 0 and n_docs > 1:
        n_test = min(max(n_test, 1), n_docs - 1)
    is_test = np.zeros(n_docs, dtype=bool)
    is_test[np.random.default_rng(seed).permutation(n_docs)[:n_test]] = True
    return is_test


def _file_signature(paths: Sequence[Path]) -> list:
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def prepare_pretrain(args: PretrainDataArguments) -> dict:
    """Build the packed pretraining DatasetDict described by `args` and return its metadata.

    Documents are split train/test first (by document, seeded), each tokenized with EOS
    appended, then concatenated and cut into rows of exactly `context_length` tokens; only the
    final partial row of each split is dropped (counted in metadata). Work proceeds in shards
    of about `shard_mb` MB of text; finished shards survive an interruption beside the output
    folder and a rerun with the same arguments skips them.
    """
    from dlm.cli import atomic_write_text, check_output_dir

    out = check_output_dir(args.path_to_data_store, "--path_to_data_store", args.overwrite)
    _check_common_args(args)
    if args.shard_mb <= 0:
        raise UsageError(f"--shard_mb must be positive, got {args.shard_mb}")

    # Local files are read (and counted) before the slow tokenizer load, so that a bad file fails
    # fast; hub sources are opened after it, so that a bad model name fails before a download.
    sources = _pretrain_sources(args) if args.data_files else None

    from tqdm.auto import tqdm

    from dlm.tokenization import load_mlm_tokenizer, smallest_uint_dtype, special_ids, tokenizer_fingerprint

    tokenizer = load_mlm_tokenizer(args.hf_model_name, trust_remote_code=args.trust_remote_code)
    _check_context_fits_model(args)
    specials = special_ids(tokenizer)
    dtype = smallest_uint_dtype(len(tokenizer))
    sources = sources or _pretrain_sources(args)
    labels = [s.label for s in sources]

    n_docs_total = None
    if not args.streaming:
        n_docs_total = sum(s.length for s in sources)
        if args.max_documents is not None:
            n_docs_total = min(n_docs_total, args.max_documents)
        is_test_all = _test_assignment(n_docs_total, args.test_split_pct, args.dataset_split_seed)

    config = {k: v for k, v in asdict(args).items()
              if k not in ("path_to_data_store", "overwrite", "num_workers", "huggingface_cache_dir")}
    config["tokenizer_fingerprint"] = tokenizer_fingerprint(tokenizer)
    config["files"] = _file_signature(getattr(sources[0], "paths", [])) if args.data_files else None
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]

    work = out.parent / f".{out.name}.shards"
    manifest = _load_manifest(work, config_hash)
    done = manifest["shards"]
    if done:
        logger.info("resuming: %d finished shard(s) in %s are kept", len(done), work)
    split_names = ("train", "test")
    carry = {s: np.asarray(done[-1]["carry"][s], dtype=np.int64) if done else np.zeros(0, dtype=np.int64)
             for s in split_names}
    docs_done = sum(d["documents"] for d in done)

    docs: Iterator[str] = itertools.chain.from_iterable(sources)
    if args.max_documents is not None:
        docs = itertools.islice(docs, args.max_documents)
    docs = itertools.islice(docs, docs_done, None)  # resume: skip documents of finished shards

    encoder = DocumentEncoder(tokenizer, args.num_workers)
    bar = tqdm(total=n_docs_total, initial=docs_done, unit="doc", desc="tokenize+pack", dynamic_ncols=True)
    try:
        for index, shard in enumerate(_iter_shards(docs, max(1, int(args.shard_mb * (1 << 20)))), start=len(done)):
            if n_docs_total is not None:
                is_test = is_test_all[docs_done: docs_done + len(shard)]
            else:  # streaming: no total count, so each document is a seeded coin flip
                is_test = np.random.default_rng([args.dataset_split_seed, index]).random(len(shard)) \
                    < args.test_split_pct
            record = {"index": index, "documents": len(shard), "carry": {}}
            for split in split_names:
                wanted = split == "test"
                texts = [doc for doc, t in zip(shard, is_test) if t == wanted]
                ids, n_empty = encoder.encode(texts)
                rows, carry[split] = pack_rows(carry[split], ids.astype(np.int64), args.context_length)
                if len(rows):
                    _write_rows(work / f"shard-{index:05d}-{split}.arrow", rows.astype(dtype))
                record[split] = {"documents": len(texts) - n_empty, "empty_documents": n_empty,
                                 "source_tokens": int(len(ids)), "rows": int(len(rows))}
                record["carry"][split] = carry[split].tolist()
            done.append(record)
            manifest["shards"] = done
            atomic_write_text(work / "manifest.json", json.dumps(manifest))
            docs_done += len(shard)
            bar.update(len(shard))
            bar.set_postfix(rows=sum(d["train"]["rows"] + d["test"]["rows"] for d in done))
    finally:
        bar.close()
        encoder.close()

    splits = {}
    for split in split_names:
        kept_docs = sum(d[split]["documents"] for d in done)
        source_tokens = sum(d[split]["source_tokens"] for d in done)
        rows = sum(d[split]["rows"] for d in done)
        splits[split] = {"rows": rows, "tokens": rows * args.context_length, "documents": kept_docs,
                         "empty_documents": sum(d[split]["empty_documents"] for d in done),
                         "source_tokens": source_tokens, "dropped_tail_tokens": int(len(carry[split]))}
    if sum(s["documents"] for s in splits.values()) == 0:
        _discard_work(work)
        raise UsageError(f"{_source_flag(args)}: the dataset is empty (no non-empty documents in "
                         f"{', '.join(labels)})")
    if splits["train"]["rows"] == 0:
        _discard_work(work)
        raise UsageError(f"--context_length {args.context_length}: the training split holds only "
                         f"{splits['train']['source_tokens']} tokens, not one full row")
    for split, info in splits.items():
        logger.info("%s: %d documents -> %d rows of %d tokens; %d tail tokens dropped", split,
                    info["documents"], info["rows"], args.context_length, info["dropped_tail_tokens"])

    from datasets import DatasetDict

    dataset = DatasetDict({s: _split_dataset(sorted(work.glob(f"shard-*-{s}.arrow")), dtype) for s in split_names})
    metadata = {
        "format": PRETRAIN_FORMAT, "tokenizer": args.hf_model_name,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer),
        "special_ids": asdict(specials), "context_length": args.context_length, "dtype": dtype,
        "splits": splits, "sources": labels, "seed": args.dataset_split_seed,
        "test_split_pct": args.test_split_pct, "streaming": args.streaming,
        "document_separator": "eos", "created_by": "prepare_pretrain_data.py",
    }
    save_prepared(dataset, metadata, out, args.overwrite)
    _discard_work(work)
    return metadata


def _load_manifest(work: Path, config_hash: str) -> dict:
    """The resume state in `work`, or a fresh one (old shards removed) when the arguments changed."""
    path = work / "manifest.json"
    if path.is_file():
        try:
            manifest = json.loads(path.read_text())
            if manifest.get("config") == config_hash:
                return manifest
        except json.JSONDecodeError:
            pass
        logger.warning("%s holds shards of a run with other arguments: starting over", work)
        _discard_work(work)
    work.mkdir(parents=True, exist_ok=True)
    return {"config": config_hash, "shards": []}


def _discard_work(work: Path) -> None:
    import shutil
    shutil.rmtree(work, ignore_errors=True)


def _source_flag(args) -> str:
    if getattr(args, "data_files", None):
        return "--data_files"
    if getattr(args, "large_dataset", False):
        return "--large_dataset"
    return "--dataset"


def _check_common_args(args) -> None:
    """Checks shared by both tools that need no tokenizer (cheap, done first)."""
    if args.context_length < MIN_CONTEXT_LENGTH:
        raise UsageError(f"--context_length {args.context_length} is too small (at least {MIN_CONTEXT_LENGTH})")
    if not 0 <= args.test_split_pct < 1:
        raise UsageError(f"--test_split_pct must be a fraction in [0, 1), got {args.test_split_pct}")
    if args.num_workers < 1:
        raise UsageError(f"--num_workers must be at least 1, got {args.num_workers}")
    if args.data_files:
        expand_data_files(args.data_files)


def _check_context_fits_model(args) -> None:
    """Refuse rows longer than the model's position embeddings, when the model's config is at hand."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(args.hf_model_name, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError):
        return  # tokenizer-only folder
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and args.context_length > limit:
        raise UsageError(f"--context_length {args.context_length} exceeds the model's "
                         f"max_position_embeddings ({limit})")


# ----------------------------------------------------------------------------------------------
# SFT data: records -> chat messages -> rendered ids with an answer mask
# ----------------------------------------------------------------------------------------------

DEFAULT_SFT_DATASET = "tatsu-lab/alpaca"
SFT_FORMATS = ("alpaca", "openorca", "messages", "sharegpt")
# Columns each format needs (required) and may use (optional).
SFT_COLUMNS = {
    "alpaca": (("instruction", "output"), ("input",)),
    "openorca": (("question", "response"), ("system_prompt",)),
    "messages": (("messages",), ()),
    "sharegpt": (("conversations",), ()),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system"}


@dataclass
class SFTDataArguments:
    """Flags of prepare_sft_data.py (reference recipe names first, Hugging Face names as aliases)."""

    path_to_data_store: str = field(metadata={
        "help": "Output folder: a DatasetDict (train/test) plus metadata.json, written atomically.",
        "aliases": ["--output_dir"]})
    hf_model_name: str = field(default="answerdotai/ModernBERT-large", metadata={
        "help": "Hub id or local folder of the masked LM (or tokenizer) whose tokenizer is used.",
        "aliases": ["--model_name_or_path", "--tokenizer_name"]})
    context_length: int = field(default=1024, metadata={
        "help": "Maximum length of a rendered sample, in tokens (see --overlong).",
        "aliases": ["--max_seq_length"]})
    dataset: str | None = field(default=None, metadata={
        "help": f"Hub dataset as NAME or NAME:CONFIG (default {DEFAULT_SFT_DATASET} unless --data_files).",
        "aliases": ["--dataset_name"]})
    dataset_split: str = field(default="train", metadata={"help": "Split of the hub dataset to read."})
    data_files: list[str] | None = field(default=None, metadata={
        "help": "Local .json/.jsonl/.parquet/.csv files or globs (instead of a hub dataset)."})
    format: str | None = field(default=None, metadata={
        "help": "Record format; detected from the columns when omitted.", "choices": list(SFT_FORMATS)})
    overlong: str = field(default="drop", metadata={
        "help": "Samples longer than --context_length: drop them, or truncate them (the answer end may be lost; "
                "a sample whose prompt alone fills the context is dropped either way).",
        "choices": ["drop", "truncate"]})
    test_split_pct: float = field(default=0.01, metadata={
        "help": "Fraction of records held out for the test split (0.01 = 1%%)."})
    dataset_split_seed: int = field(default=42, metadata={
        "help": "Seed of the train/test split.", "aliases": ["--seed"]})
    num_workers: int = field(default=1, metadata={
        "help": "Tokenizer processes.", "aliases": ["--preprocessing_num_workers"]})
    huggingface_cache_dir: str | None = field(default=None, metadata={
        "help": "Cache folder for hub downloads.", "aliases": ["--cache_dir"]})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --path_to_data_store."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom tokenizer code from the hub."})


def detect_format(columns: Iterable[str], fmt: str | None = None, where: str = "the dataset",
                  flag: str = "--data_files") -> str:
    """The SFT format of records with these columns (or check that `fmt` fits them)."""
    columns = set(columns)
    if fmt is None:
        if "messages" in columns:
            fmt = "messages"
        elif "conversations" in columns:
            fmt = "sharegpt"
        elif "question" in columns or "response" in columns:
            fmt = "openorca"
        elif "instruction" in columns or "output" in columns:
            fmt = "alpaca"
        else:
            raise UsageError(f"{flag}: cannot detect the format of {where}: expected instruction/output "
                             f"(Alpaca), question/response (OpenOrca), messages or conversations "
                             f"(columns found: {', '.join(sorted(columns)) or 'none'})")
    if fmt not in SFT_COLUMNS:
        raise UsageError(f"--format must be one of {', '.join(SFT_FORMATS)}, got {fmt!r}")
    for column in SFT_COLUMNS[fmt][0]:
        if column not in columns:
            raise _columns_error(flag, where, column, columns, f" for the {fmt} format")
    return fmt


def alpaca_to_messages(record: dict) -> list[dict]:
    """An Alpaca record as a chat: the user turn is the instruction, then a blank line and the input
    when there is one (both exactly as written); the output is the assistant turn."""
    user = record["instruction"]
    if record.get("input"):
        user = f"{user}\n\n{record['input']}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def record_to_messages(record: dict, fmt: str) -> list[dict]:
    """One record of a given SFT format as a list of {role, content} messages."""
    if fmt == "alpaca":
        return alpaca_to_messages(record)
    if fmt == "openorca":
        messages = [{"role": "system", "content": record["system_prompt"]}] if record.get("system_prompt") else []
        return messages + [{"role": "user", "content": record["question"]},
                           {"role": "assistant", "content": record["response"]}]
    if fmt == "messages":
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    if fmt == "sharegpt":
        messages = []
        for turn in record["conversations"]:
            role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
            if role is None:
                raise UsageError(f"--format sharegpt: unknown speaker {turn.get('from')!r} "
                                 f"(known: {', '.join(SHAREGPT_ROLES)})")
            messages.append({"role": role, "content": turn["value"]})
        return messages
    raise UsageError(f"--format must be one of {', '.join(SFT_FORMATS)}, got {fmt!r}")


def records_to_messages(records: Iterable[dict], fmt: str | None = None) -> list[list[dict]]:
    """Chats of a list of records; the format is detected from the first record's keys unless given."""
    records = list(records)
    if not records:
        return []
    fmt = detect_format(records[0].keys(), fmt, where="the records", flag="--format")
    return [record_to_messages(r, fmt) for r in records]


def assistant_char_spans(tokenizer, messages: Sequence[dict], text: str | None = None) -> list[tuple[int, int]]:
    """Character spans of the rendered chat that belong to the answer: each assistant turn's content
    and its end-of-turn marker.

    Found by rendering prefixes of the chat, so any template whose generation prompt is a prefix of
    the full rendering works; a template that breaks that property is reported.
    """
    from dlm.tokenization import render_chat

    text = render_chat(tokenizer, messages) if text is None else text
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render_chat(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(render_chat(tokenizer, messages[: i + 1]))
        if not text.startswith(render_chat(tokenizer, messages[:i], add_generation_prompt=True)):
            raise UsageError("the chat template's generation prompt is not a prefix of the full rendering")
        spans.append((start, end))
    return spans


def answer_mask_from_offsets(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """1 for tokens whose first character lies in one of the spans, 0 elsewhere (vectorised)."""
    if not spans or len(offsets) == 0:
        return np.zeros(len(offsets), dtype=np.uint8)
    starts = offsets[:, 0][:, None]
    bounds = np.asarray(spans)
    return ((starts >= bounds[None, :, 0]) & (starts < bounds[None, :, 1])).any(axis=1).astype(np.uint8)


def encode_sft_batch(tokenizer, chats: Sequence[Sequence[dict]]) -> tuple[list[list[int]], list[np.ndarray]]:
    """Ids (exactly `encode_chat` of each chat) and answer masks for a batch of chats."""
    from dlm.tokenization import render_chat

    texts = [render_chat(tokenizer, chat) for chat in chats]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
                    return_token_type_ids=False)
    masks = [answer_mask_from_offsets(np.asarray(offsets, dtype=np.int64).reshape(-1, 2),
                                      assistant_char_spans(tokenizer, chat, text))
             for chat, text, offsets in zip(chats, texts, enc["offset_mapping"])]
    return enc["input_ids"], masks


def _load_sft_records(args: SFTDataArguments):
    """The source records as a `datasets.Dataset`, a label for metadata and messages, and the format."""
    if args.data_files:  # parsed and checked before `datasets` is imported, so bad files fail fast
        paths = expand_data_files(args.data_files, allowed=RECORD_EXTENSIONS)
        records = []
        for path in paths:
            records.extend(iter_local_records(path))
        label = ",".join(str(p) for p in paths)
        if not records:
            raise UsageError(f"--data_files {label}: the dataset is empty (no records)")
        columns = set().union(*(r.keys() for r in records))
        fmt = detect_format(columns, args.format, where=label)
        wanted = [c for c in (*SFT_COLUMNS[fmt][0], *SFT_COLUMNS[fmt][1]) if c in columns]
        from datasets import Dataset
        # Only the columns the format reads: other columns may hold values Arrow cannot unify.
        return Dataset.from_list([{c: r.get(c) for c in wanted} for r in records]), label, fmt
    from datasets import load_dataset

    spec = args.dataset or DEFAULT_SFT_DATASET
    name, config = _split_name(spec)
    try:
        ds = load_dataset(name, config, split=args.dataset_split, cache_dir=args.huggingface_cache_dir)
    except Exception as err:  # connection, missing config or split: datasets raises many types
        raise UsageError(f"--dataset {spec}: cannot load split {args.dataset_split!r} "
                         f"({str(err).splitlines()[0]})") from None
    if len(ds) == 0:
        raise UsageError(f"--dataset {spec}: the dataset is empty")
    fmt = detect_format(ds.column_names, args.format, where=spec, flag="--dataset")
    return ds, spec, fmt


def prepare_sft(args: SFTDataArguments) -> dict:
    """Build the SFT DatasetDict (input_ids, answer_mask, length) described by `args`; return its metadata.

    Each record becomes a chat, rendered with the tokenizer's chat template; `answer_mask` is 1 on
    every assistant turn's tokens and its end-of-turn token. Over-long samples are dropped or
    truncated per `--overlong`, with counts in the metadata.
    """
    from dlm.cli import check_output_dir

    out = check_output_dir(args.path_to_data_store, "--path_to_data_store", args.overwrite)
    _check_common_args(args)
    records, label, fmt = _load_sft_records(args)

    from datasets import DatasetDict, Features, List, Value

    from dlm.tokenization import load_mlm_tokenizer, smallest_uint_dtype, special_ids, tokenizer_fingerprint

    tokenizer = load_mlm_tokenizer(args.hf_model_name, trust_remote_code=args.trust_remote_code)
    _check_context_fits_model(args)
    specials = special_ids(tokenizer)
    dtype = smallest_uint_dtype(len(tokenizer))
    limit, truncate = args.context_length, args.overlong == "truncate"

    def encode(batch: dict) -> dict:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        chats = [record_to_messages(r, fmt) for r in rows]
        ids, masks = encode_sft_batch(tokenizer, chats)
        out_ids, out_masks, lengths, overlong, no_answer, answer_cut = [], [], [], [], [], []
        for seq, mask in zip(ids, masks):
            too_long = len(seq) > limit
            no_answer.append(not mask.any())  # the record itself has no assistant turn
            if too_long and truncate:
                seq, mask = seq[:limit], mask[:limit]
            out_ids.append(seq)
            out_masks.append(mask.tolist())
            lengths.append(len(seq))
            overlong.append(too_long)
            answer_cut.append(not no_answer[-1] and not mask.any())  # the prompt alone fills the context
        return {"input_ids": out_ids, "answer_mask": out_masks, "length": lengths,
                "overlong": overlong, "no_answer": no_answer, "answer_cut": answer_cut}

    features = Features({"input_ids": List(Value(dtype)), "answer_mask": List(Value("uint8")),
                         "length": Value("int32"), "overlong": Value("bool"), "no_answer": Value("bool"),
                         "answer_cut": Value("bool")})
    encoded = records.map(encode, batched=True, batch_size=256, remove_columns=records.column_names,
                          features=features, num_proc=args.num_workers if args.num_workers > 1 else None,
                          desc="render+tokenize", load_from_cache_file=False)
    overlong = np.asarray(encoded["overlong"], dtype=bool) & ~np.asarray(encoded["no_answer"], dtype=bool)
    no_answer = np.asarray(encoded["no_answer"], dtype=bool)
    # Over-long samples are dropped, or truncated; a truncation that would cut the whole answer away
    # (the prompt alone is longer than the context) drops the sample too, and is counted as dropped.
    dropped = overlong & (np.asarray(encoded["answer_cut"], dtype=bool) if truncate else True)
    keep = ~no_answer & ~dropped
    n_dropped_overlong = int(dropped.sum())
    n_truncated = int((overlong & ~dropped).sum())
    if n_dropped_overlong and truncate:
        logger.warning("dropped %d of %d samples whose prompt alone fills --context_length %d (no answer "
                       "token would be left)", n_dropped_overlong, len(encoded), limit)
    elif n_dropped_overlong:
        logger.warning("dropped %d of %d samples longer than --context_length %d (use --overlong truncate "
                       "to keep them cut)", n_dropped_overlong, len(encoded), limit)
    if n_truncated:
        logger.warning("truncated %d samples to --context_length %d", n_truncated, limit)
    if no_answer.any():
        logger.warning("skipped %d records with no assistant answer", int(no_answer.sum()))
    kept = np.flatnonzero(keep)
    if len(kept) == 0:
        raise UsageError(f"--context_length {limit}: no sample is left (all {n_dropped_overlong} usable samples "
                         f"are longer; raise --context_length or pass --overlong truncate)"
                         if n_dropped_overlong else f"{_source_flag(args)} {label}: no record has an answer")
    is_test = _test_assignment(len(kept), args.test_split_pct, args.dataset_split_seed)
    encoded = encoded.remove_columns(["overlong", "no_answer", "answer_cut"])
    dataset = DatasetDict({"train": encoded.select(kept[~is_test]), "test": encoded.select(kept[is_test])})
    lengths = np.asarray(encoded["length"], dtype=np.int64)
    splits = {}
    for split, index in (("train", kept[~is_test]), ("test", kept[is_test])):
        answer_tokens = sum(int(np.sum(m)) for m in dataset[split]["answer_mask"]) if len(index) else 0
        splits[split] = {"rows": int(len(index)), "tokens": int(lengths[index].sum()),
                         "answer_tokens": answer_tokens,
                         "max_length": int(lengths[index].max()) if len(index) else 0}
    metadata = {
        "format": SFT_FORMAT, "tokenizer": args.hf_model_name,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer),
        "special_ids": asdict(specials), "context_length": limit, "dtype": dtype, "splits": splits,
        "sources": [label], "record_format": fmt, "seed": args.dataset_split_seed,
        "test_split_pct": args.test_split_pct,
        "overlong": {"policy": args.overlong, "dropped": n_dropped_overlong, "truncated": n_truncated},
        "records": len(records), "skipped_no_answer": int(no_answer.sum()), "created_by": "prepare_sft_data.py",
    }
    save_prepared(dataset, metadata, out, args.overwrite)
    logger.info("train %d / test %d samples (%s format); %d dropped, %d truncated as over-long",
                splits["train"]["rows"], splits["test"]["rows"], fmt, n_dropped_overlong, n_truncated)
    return metadata
