"""Where documents and records come from: local files (text, JSON lines, JSON, CSV, parquet) and hub datasets,
plus the checks of the preparation flags that need no tokenizer."""

from __future__ import annotations

import contextlib
import glob as _glob
import itertools
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlm.errors import UsageError

TEXT_EXTENSIONS = (".txt",)
RECORD_EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv")


@dataclass
class PrepareArguments:
    """Flags both preparation scripts take (reference recipe names first, Hugging Face names as aliases)."""

    path_to_data_store: str = field(metadata={
        "help": "Output folder: a DatasetDict (train/test) plus metadata.json, written atomically.",
        "aliases": ["--output_dir"]})
    hf_model_name: str = field(default="answerdotai/ModernBERT-large", metadata={
        "help": "Hub id or local folder of the masked LM (or tokenizer) whose tokenizer is used.",
        "aliases": ["--model_name_or_path", "--tokenizer_name"]})
    dataset_split_seed: int = field(default=42, metadata={
        "help": "Seed of the train/test split (by document or record).", "aliases": ["--seed"]})
    num_workers: int = field(default=1, metadata={
        "help": "Tokenizer processes.", "aliases": ["--preprocessing_num_workers"]})
    huggingface_cache_dir: str | None = field(default=None, metadata={
        "help": "Cache folder for hub downloads.", "aliases": ["--cache_dir"]})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --path_to_data_store."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom code from the hub."})
    skip_bad_records: bool = field(default=False, metadata={
        "help": "Skip records with a text field of the wrong type (a number, object, list or null) instead of "
                "stopping with an error; metadata.json counts them."})


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
    for _, record in iter_located_records(path, flag):
        yield record


def iter_located_records(path: Path, flag: str = "--data_files") -> Iterator[tuple[str, dict]]:
    """(where, record) pairs of a record file: `where` is "line N" (JSON lines, CSV) or "record N" (JSON list,
    parquet), for error messages that point at the record. Undecodable bytes are a `UsageError`."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _iter_parquet(path, flag)
    elif suffix == ".csv":
        yield from _iter_csv(path, flag)
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
        except RecursionError:
            raise UsageError(f"{flag} {path}: JSON nested too deeply to read") from None
        _check_surrogates(text, data, f"{flag} {path}")
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(data) == 1 and lists else [data]
        if not isinstance(data, list):
            raise UsageError(f"{flag} {path}: expected a list of objects, got {type(data).__name__}")
        for i, record in enumerate(data):
            if not isinstance(record, dict):
                raise UsageError(f"{flag} {path}: record {i} is a {type(record).__name__}, not an object")
            yield f"record {i}", record
    else:
        raise UsageError(f"{flag} {path}: not a record file (.json, .jsonl, .csv, .parquet)")


def _iter_parquet(path: Path, flag: str) -> Iterator[tuple[str, dict]]:
    from datasets import load_dataset

    try:  # streaming: record batches are read as they are consumed, nothing is cached
        records = iter(load_dataset("parquet", data_files=[str(path)], split="train", streaming=True))
        for i in itertools.count():
            record = next(records, None)
            if record is None:
                return
            yield f"record {i}", record
    except Exception as err:  # pyarrow and datasets raise several types for damaged files
        raise UsageError(f"{flag} {path}: cannot read parquet ({_first_line(err)})") from None


# Ours, not the `csv` builder: that one (pandas) turns "42" into an int and "" into null, and reads a row
# with one field too many by silently shifting its columns into an index; csv.DictReader keeps the text.
def _iter_csv(path: Path, flag: str) -> Iterator[tuple[str, dict]]:
    import csv

    extra = object()  # DictReader's key for fields beyond the header
    with _decoding_errors(path, flag), open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, restkey=extra)
        try:
            for record in reader:
                if extra in record or None in record.values():
                    n = len(record) - 1 + len(record[extra]) if extra in record else \
                        sum(v is not None for v in record.values())
                    raise UsageError(f"{flag} {path} line {reader.line_num}: {n} fields, the header has "
                                     f"{len(reader.fieldnames)}")
                yield f"line {reader.line_num}", record
        except csv.Error as err:
            raise UsageError(f"{flag} {path} line {reader.line_num}: malformed CSV ({err})") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


@contextlib.contextmanager
def _decoding_errors(path: Path, flag: str) -> Iterator[None]:
    """Report bytes that are not UTF-8 (a binary file under a text name) as one line naming the file."""
    try:
        yield
    except UnicodeDecodeError as err:
        raise UsageError(f"{flag} {path}: not UTF-8 text ({err.reason} at byte {err.start} of a read block): "
                         f"is it a binary file?") from None


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # "-sig": a byte-order mark is not part of the text
    except UnicodeDecodeError as err:
        raise UsageError(f"{flag} {path}: not UTF-8 text ({err.reason} at byte {err.start}): "
                         f"is it a binary file?") from None
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot read ({err.strerror})") from None


# Ours, not the `json` builder: that one infers one Arrow type per column over a whole block, so it cannot
# name the line of a malformed record or of a value of the wrong type, nor tell a missing key from a null.
def _iter_json_lines(path: Path, flag: str) -> Iterator[tuple[str, dict]]:
    with _decoding_errors(path, flag), open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = _parse_json(line, f"{flag} {path} line {lineno}")
            if not isinstance(record, dict):
                raise UsageError(f"{flag} {path} line {lineno}: expected a JSON object, "
                                 f"got {type(record).__name__}")
            yield f"line {lineno}", record


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _parse_json(text: str, where: str) -> Any:
    """json.loads of one JSON line, with its failures as one line naming `where`."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"{where}: malformed JSON ({err.msg})") from None
    except RecursionError:
        raise UsageError(f"{where}: JSON nested too deeply to read") from None
    _check_surrogates(text, value, where)
    return value


def _check_surrogates(text: str, value: Any, where: str) -> None:
    """Refuse escapes of lone UTF-16 surrogates: valid JSON, but not text that a tokenizer or Arrow takes.
    Only a text holding such an escape (rare) is re-encoded to check it."""
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"{where}: a \\u escape of a lone UTF-16 surrogate, which is not text") from None


TXT_SAMPLE_BY = {"line": "line", "file": "document"}


def iter_text_file(path: Path, split_by: str = "paragraph", flag: str = "--data_files") -> Iterator[str]:
    """Documents of a plain-text file: blank-line separated paragraphs, single lines, or the whole file.

    Lines and whole files come from `datasets`' `text` builder (streamed, nothing cached); whitespace-only
    lines are not documents. Paragraphs are read line by line, so a file larger than memory streams.
    """
    with _decoding_errors(path, flag):
        if split_by in TXT_SAMPLE_BY:
            from datasets import load_dataset

            docs = load_dataset("text", data_files=[str(path)], sample_by=TXT_SAMPLE_BY[split_by], split="train",
                                streaming=True, encoding="utf-8-sig")
            yield from (d["text"] for d in docs if split_by == "file" or d["text"].strip())
            return
        # Ours for paragraphs: the builder splits only at "\n\n", so a line of spaces does not end a
        # paragraph and "\n\n\n" starts the next one with a newline.
        with open(path, encoding="utf-8-sig") as f:
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
    found = ", ".join(sorted(map(str, columns))) or "none"
    return UsageError(f"{flag}: no column {missing!r}{what} in {where} (columns found: {found})")


def type_name(value: Any) -> str:
    """A JSON-style name of a value's type, for messages and skip counts."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


def bad_text(value: Any, where: str, field: str, skipped: Counter | None) -> None:
    """A non-string text value: counted in `skipped` (by type) when skipping was asked for, else an error."""
    if skipped is None:
        raise UsageError(f"{where}: field {field!r} is {type_name(value)}, not a string "
                         f"(pass --skip_bad_records to skip such records, counted in metadata.json)")
    skipped[type_name(value)] += 1


def iter_local_texts(paths: Sequence[Path], text_column: str = "text", split_by: str = "paragraph",
                     flag: str = "--data_files", skipped: Counter | None = None) -> Iterator[str]:
    """Documents of local files, in file order: text files by `split_by`, record files by `text_column`.

    A record whose text is not a string (a number, an object, a list, null) is an error naming the file,
    line and type, or, when a `skipped` counter is given, is counted there by type and left out.
    """
    for path in paths:
        if path.suffix.lower() in TEXT_EXTENSIONS:
            yield from iter_text_file(path, split_by, flag)
            continue
        for where, record in iter_located_records(path, flag):
            if text_column not in record:
                raise columns_error("--text_column", f"{path} ({where})", text_column, record)
            text = record[text_column]
            if isinstance(text, str):
                yield text
            else:
                bad_text(text, f"{flag} {path} {where}", text_column, skipped)


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
    """The documents of one named source (a hub dataset or local files), iterated lazily.

    `skipped` counts, by type, the records left out of the last pass for a non-string text (only with
    --skip_bad_records; without it they are an error).
    """

    def __init__(self, label: str, iterate, length: int | None = None, skip_bad: bool = False):
        self.label, self._iterate, self.length = label, iterate, length
        self.skip_bad, self.skipped = skip_bad, Counter()

    def __iter__(self) -> Iterator[str]:
        self.skipped = Counter()
        return self._iterate(self.skipped if self.skip_bad else None)


def hub_text_source(spec: str, split: str, args: PrepareArguments) -> PretrainSource:
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
    feature = (getattr(ds, "features", None) or {}).get(column)
    if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise UsageError(f"--text_column {column}: the column of {spec} holds {feature}, not strings")
    skip = getattr(args, "skip_bad_records", False)
    if args.streaming:
        def iterate(skipped: Counter | None) -> Iterator[str]:
            for i, example in enumerate(ds):
                if column not in example:
                    raise columns_error("--text_column", spec, column, example)
                if isinstance(example[column], str):
                    yield example[column]
                else:
                    bad_text(example[column], f"--dataset {spec} record {i}", column, skipped)
        return PretrainSource(spec, iterate, skip_bad=skip)

    def iterate_arrow(skipped: Counter | None) -> Iterator[str]:
        for start, batch in enumerate(ds.select_columns([column]).iter(batch_size=1000)):
            for i, text in enumerate(batch[column]):
                if isinstance(text, str):
                    yield text
                else:
                    bad_text(text, f"--dataset {spec} record {start * 1000 + i}", column, skipped)
    return PretrainSource(spec, iterate_arrow, len(ds), skip_bad=skip)


def pretrain_sources(args: PrepareArguments) -> list[PretrainSource]:
    if args.data_files:
        paths = expand_data_files(args.data_files)

        def iterate(skipped: Counter | None) -> Iterator[str]:
            return iter_local_texts(paths, args.text_column, args.txt_split_by, skipped=skipped)
        source = PretrainSource(",".join(str(p) for p in paths), iterate, skip_bad=args.skip_bad_records)
        source.paths = paths
        if not args.streaming:  # the exact split needs the count: one cheap pass over the files
            source.length = sum(1 for _ in source)
            if source.length == 0:
                raise UsageError(f"--data_files {source.label}: the dataset is empty (no documents"
                                 f"{skipped_note(source.skipped)})")
        return [source]
    if args.large_dataset:
        return [hub_text_source(spec, args.dataset_split or "train", args) for spec in LARGE_DATASETS]
    if args.dataset:
        return [hub_text_source(spec, args.dataset_split or "train", args) for spec in args.dataset]
    return [hub_text_source(DEFAULT_PRETRAIN_DATASET, args.dataset_split or DEFAULT_PRETRAIN_SPLIT, args)]


def skipped_note(skipped: Counter) -> str:
    return f"; {sum(skipped.values())} records skipped: {dict(skipped)}" if skipped else ""


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
