"""Prepared datasets on disk: the format names, metadata.json, atomic saves, shard files and the resume manifest."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dlm.errors import UsageError, atomic_output_dir, atomic_write_text, check_output_dir

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


def save_prepared(dataset, metadata: dict, out: str | Path, overwrite: bool, needed_bytes: int | None = None) -> None:
    """Write a prepared `DatasetDict` and its metadata.json atomically (metadata last); a full disk is one
    line naming the output (`atomic_output_dir`), with `needed_bytes` as the size a complete one takes.

    An empty split (a tiny corpus with a 0.5% test split, or --test_split_pct 0) is written as one
    empty Arrow file: `datasets` saves it with no file at all, which `load_from_disk` cannot read.
    """

    for split, ds in dataset.items():
        if len(ds) == 0:
            logger.warning("the %s split is empty", split)
    with atomic_output_dir(out, "--path_to_data_store", overwrite, needed_bytes) as tmp:
        dataset.save_to_disk(str(tmp), num_shards={k: 1 if len(v) == 0 else None for k, v in dataset.items()})
        atomic_write_text(tmp / METADATA_FILE, json.dumps(metadata, indent=2))


def shard_name(index: int, split: str) -> str:
    return f"shard-{index:05d}-{split}.arrow"


def write_rows(path: Path, rows: np.ndarray) -> None:
    """Write rows [n, L] as an Arrow stream file with one list<uint*> column `input_ids`."""
    import pyarrow as pa

    n, length = rows.shape
    offsets = pa.array(np.arange(0, n * length + 1, length, dtype=np.int32))
    table = pa.table({"input_ids": pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1)))})
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=max(1, (1 << 24) // max(length, 1)))
    tmp.replace(path)


def split_dataset(paths: list[Path], dtype: str):
    """A memory-mapped Dataset over the shard files of one split (an empty typed one if none)."""
    from datasets import Dataset, Features, List, Value, concatenate_datasets

    if not paths:
        return Dataset.from_dict({"input_ids": []}, features=Features({"input_ids": List(Value(dtype))}))
    parts = [Dataset.from_file(str(p)) for p in paths]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)



@contextlib.contextmanager
def output_lock(out: Path, flag: str = "--path_to_data_store") -> Iterator[None]:
    """Hold an exclusive lock on the output folder `out` for a whole preparation run.

    A second run writing the same folder (same or other arguments) is refused in one line instead of
    mixing its shards with ours; a run that died (SIGKILL, power loss) holds no lock, and what it left
    beside the output (`.NAME.tmp-*` from an unfinished final write) is removed here.
    """
    import fcntl

    path = out.parent / f".{out.name}.lock"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise UsageError(f"{flag} {out}: another preparation run (pid {holder}) is writing this folder "
                                 f"(lock {path}); wait for it to end or choose another folder") from None
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break  # else the holder removed the file after we opened it: lock the new one
            except FileNotFoundError:
                pass
            os.close(fd)
    except OSError as err:
        raise UsageError(f"{flag} {out}: cannot create the lock file {path} ({err.strerror})") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _remove_leftovers(out)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def prepare_locked(args, prepare: Callable[[Any, Path], dict]) -> dict:
    """Run `prepare(args, out)` holding the lock on `--path_to_data_store`, once the folder may be written."""
    out = Path(args.path_to_data_store)
    with output_lock(out):
        check_output_dir(out, "--path_to_data_store", args.overwrite)
        return prepare(args, out)


def _remove_leftovers(out: Path) -> None:
    """Under the lock, what a dead run of `out` left behind: half-written output folders, and a previous
    output moved aside (`.NAME.old-*`) but not yet replaced, which is put back when `out` is missing."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        logger.warning("removing %s, left by an interrupted run", tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    for old in out.parent.glob(f".{out.name}.old-*"):
        if not out.exists():
            logger.warning("restoring %s from %s, left by an interrupted run", out, old)
            old.rename(out)
        else:
            shutil.rmtree(old, ignore_errors=True)


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def disk_full_errors(what: str, path: Path, needed_bytes: int | None = None) -> Iterator[None]:
    """Report a full disk (or quota, or file size limit) while writing `what` to `path` in one line.

    pyarrow raises its write errors as plain OSError with the errno only in the text, hence the text check.
    """
    try:
        yield
    except OSError as err:
        text = str(err)
        if err.errno not in DISK_FULL_ERRNOS and not any(f"errno {e}]" in text for e in DISK_FULL_ERRNOS) \
                and "No space left" not in text and "File too large" not in text:
            raise
        reason = os.strerror(err.errno) if err.errno in DISK_FULL_ERRNOS else text.splitlines()[0]
        need = f"; about {needed_bytes / 2**20:.1f} MB are needed" if needed_bytes else ""
        raise UsageError(f"disk full while writing {what} to {path} ({reason}){need}; nothing complete was "
                         f"changed: free space and run the same command again") from None


def load_manifest(work: Path, config_hash: str) -> dict:
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
        discard_work(work)
    work.mkdir(parents=True, exist_ok=True)
    return {"config": config_hash, "shards": []}


def discard_work(work: Path) -> None:
    import shutil
    shutil.rmtree(work, ignore_errors=True)

