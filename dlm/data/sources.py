"""Where documents and records come from: local files (text, JSON lines, JSON, CSV, parquet) and hub datasets,
plus the checks of the preparation flags that need no tokenizer."""

from __future__ import annotations

import glob as _glob
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from dlm.errors import UsageError

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


def columns_error(flag: str, where: str, missing: str, columns: Iterable[str], what: str = "") -> UsageError:
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
                raise columns_error("--text_column", f"{path} (record {i})", text_column, record)
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


def split_name(spec: str) -> tuple[str, str | None]:
    """'NAME:CONFIG' -> (NAME, CONFIG); a bare name has no config."""
    name, _, config = spec.partition(":")
    return name, config or None


class PretrainSource:
    """The documents of one named source (a hub dataset or local files), iterated lazily."""

    def __init__(self, label: str, iterate, length: int | None = None):
        self.label, self._iterate, self.length = label, iterate, length

    def __iter__(self) -> Iterator[str]:
        return self._iterate()


def hub_text_source(spec: str, split: str, args: PretrainDataArguments) -> PretrainSource:
    from datasets import load_dataset

    name, config = split_name(spec)
    try:
        ds = load_dataset(name, config, split=split, streaming=args.streaming, cache_dir=args.huggingface_cache_dir)
    except Exception as err:  # datasets raises many types (connection, missing config, missing split)
        raise UsageError(f"--dataset {spec}: cannot load split {split!r} ({str(err).splitlines()[0]})") from None
    column = args.text_column
    columns = getattr(ds, "column_names", None)
    if columns is not None and column not in columns:
        raise columns_error("--text_column", spec, column, columns)
    if args.streaming:
        def iterate() -> Iterator[str]:
            for example in ds:
                if column not in example:
                    raise columns_error("--text_column", spec, column, example)
                if example[column] is not None:
                    yield example[column]
        return PretrainSource(spec, iterate)

    def iterate_arrow() -> Iterator[str]:
        for batch in ds.select_columns([column]).iter(batch_size=1000):
            yield from (t for t in batch[column] if t is not None)
    return PretrainSource(spec, iterate_arrow, len(ds))


def pretrain_sources(args: PretrainDataArguments) -> list[PretrainSource]:
    if args.data_files:
        paths = expand_data_files(args.data_files)

        def iterate() -> Iterator[str]:
            return iter_local_texts(paths, args.text_column, args.txt_split_by)
        source = PretrainSource(",".join(str(p) for p in paths), iterate)
        source.paths = paths
        if not args.streaming:  # the exact split needs the count: one cheap pass over the files
            source.length = sum(1 for _ in iterate())
            if source.length == 0:
                raise UsageError(f"--data_files {source.label}: the dataset is empty (no documents)")
        return [source]
    if args.large_dataset:
        return [hub_text_source(spec, args.dataset_split or "train", args) for spec in LARGE_DATASETS]
    if args.dataset:
        return [hub_text_source(spec, args.dataset_split or "train", args) for spec in args.dataset]
    return [hub_text_source(DEFAULT_PRETRAIN_DATASET, args.dataset_split or DEFAULT_PRETRAIN_SPLIT, args)]


def file_signature(paths: Sequence[Path]) -> list:
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def source_flag(args) -> str:
    if getattr(args, "data_files", None):
        return "--data_files"
    if getattr(args, "large_dataset", False):
        return "--large_dataset"
    return "--dataset"


def check_common_args(args) -> None:
    """Checks shared by both tools that need no tokenizer (cheap, done first)."""
    if args.context_length < MIN_CONTEXT_LENGTH:
        raise UsageError(f"--context_length {args.context_length} is too small (at least {MIN_CONTEXT_LENGTH})")
    if not 0 <= args.test_split_pct < 1:
        raise UsageError(f"--test_split_pct must be a fraction in [0, 1), got {args.test_split_pct}")
    if args.num_workers < 1:
        raise UsageError(f"--num_workers must be at least 1, got {args.num_workers}")
    if args.data_files:
        expand_data_files(args.data_files)


def check_context_fits_model(args) -> None:
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
