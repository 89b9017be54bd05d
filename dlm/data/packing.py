"""Pretraining data: documents -> EOS-separated token stream -> rows of exactly context_length, in resumable shards."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dlm.data.sources import (PrepareArguments, check_common_args, check_context_fits_model, file_signature,
                              pretrain_sources, skipped_note, source_flag)
from dlm.data.split import test_assignment
from dlm.data.storage import (PRETRAIN_FORMAT, discard_work, disk_full_errors, load_manifest, prepare_locked,
                              save_prepared, shard_name, split_dataset, write_rows)
from dlm.errors import UsageError, atomic_write_text

logger = logging.getLogger(__name__)


@dataclass
class PretrainDataArguments(PrepareArguments):
    """Flags of prepare_pretrain_data.py (reference recipe names first, Hugging Face names as aliases)."""

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
    streaming: bool = field(default=False, metadata={
        "help": "Stream the sources instead of downloading them whole (corpora larger than RAM or disk); "
                "the test split is then drawn per document with probability --test_split_pct."})
    shard_mb: float = field(default=64, metadata={
        "help": "Text per shard (MB): memory is bounded by one shard; finished shards are kept so that a "
                "rerun after an interruption resumes."})
    max_documents: int | None = field(default=None, metadata={"help": "Stop after this many documents."})


def pack_rows(carry: np.ndarray, ids: np.ndarray, context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Append `ids` to the leftover `carry` and cut full rows: (rows [n, context_length], new carry)."""
    stream = np.concatenate([carry, ids]) if len(carry) else ids
    n = len(stream) // context_length
    return stream[: n * context_length].reshape(n, context_length), stream[n * context_length:]


_WORKER_TOKENIZER = None


def _init_worker(tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


# Documents longer than this are tokenized in pieces: the tokenizer's output for one 50 MB line would
# otherwise peak at about 8 GB (offsets, token strings), for ids that take 100 MB as int32.
PIECE_CHARS = 1 << 17


def text_pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """Consecutive pieces of `text` of at most `size` characters, each cut where a run of whitespace
    starts after a non-space character, so that the tokenizer's pre-tokens (words with their leading
    space) are the same as in the whole text; a window with no whitespace is cut hard."""
    start = 0
    while len(text) - start > size:
        end = start + size
        half = start + size // 2  # the cut is looked for in the second half, so pieces are not tiny
        cut = max(text.rfind(" ", half, end), text.rfind("\n", half, end), text.rfind("\t", half, end))
        while cut > start + 1 and text[cut - 1].isspace():
            cut -= 1
        cut = end if cut <= start else cut
        yield text[start:cut]
        start = cut
    yield text[start:]


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids of a batch of documents; a special token's string in a document is text, never its id."""
    from dlm.tokenization import encode_texts  # here, not above: that module loads torch (2 s)

    return encode_texts(tokenizer, texts)


def _tokenize_long(tokenizer, text: str) -> np.ndarray:
    """Ids of one long document, tokenized piece by piece into a compact int32 array."""
    return np.concatenate([np.asarray(_tokenize(tokenizer, [piece])[0], dtype=np.int32)
                           for piece in text_pieces(text)])


def _encode_documents(texts: list[str], tokenizer=None) -> tuple[np.ndarray, int]:
    """Token ids of documents, each followed by EOS, as one int32 array; documents with no token are skipped."""
    tokenizer = tokenizer or _WORKER_TOKENIZER
    long = {i for i, text in enumerate(texts) if len(text) > PIECE_CHARS}
    short = iter(_tokenize(tokenizer, [t for i, t in enumerate(texts) if i not in long]))
    encoded = [_tokenize_long(tokenizer, t) if i in long else next(short) for i, t in enumerate(texts)]
    eos = tokenizer.eos_token_id
    kept = [ids for ids in encoded if len(ids)]
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


def prepare_pretrain(args: PretrainDataArguments) -> dict:
    """Build the packed pretraining DatasetDict described by `args` and return its metadata.

    Documents are split train/test first (by document, seeded), each tokenized with EOS
    appended, then concatenated and cut into rows of exactly `context_length` tokens; only the
    final partial row of each split is dropped (counted in metadata). Work proceeds in shards
    of about `shard_mb` MB of text; finished shards survive an interruption beside the output
    folder and a rerun with the same arguments skips them. The output folder is locked for the
    whole run, so a second run into it is refused.
    """
    return prepare_locked(args, _prepare_pretrain)


def _prepare_pretrain(args: PretrainDataArguments, out: Path) -> dict:
    check_common_args(args)
    if args.shard_mb <= 0:
        raise UsageError(f"--shard_mb must be positive, got {args.shard_mb}")

    # Local files are read (and counted) before the slow tokenizer load, so that a bad file fails
    # fast; hub sources are opened after it, so that a bad model name fails before a download.
    sources = pretrain_sources(args) if args.data_files else None

    from tqdm.auto import tqdm

    from dlm.tokenization import load_mlm_tokenizer, smallest_uint_dtype, special_ids, tokenizer_fingerprint

    tokenizer = load_mlm_tokenizer(args.hf_model_name, trust_remote_code=args.trust_remote_code)
    check_context_fits_model(args)
    specials = special_ids(tokenizer)
    dtype = smallest_uint_dtype(len(tokenizer))
    sources = sources or pretrain_sources(args)
    labels = [s.label for s in sources]

    n_docs_total = None
    if not args.streaming:
        n_docs_total = sum(s.length for s in sources)
        if args.max_documents is not None:
            n_docs_total = min(n_docs_total, args.max_documents)
        is_test_all = test_assignment(n_docs_total, args.test_split_pct, args.dataset_split_seed)

    config = {k: v for k, v in asdict(args).items()
              if k not in ("path_to_data_store", "overwrite", "num_workers", "huggingface_cache_dir")}
    config["tokenizer_fingerprint"] = tokenizer_fingerprint(tokenizer)
    config["files"] = file_signature(getattr(sources[0], "paths", [])) if args.data_files else None
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]

    work = out.parent / f".{out.name}.shards"
    manifest = load_manifest(work, config_hash)
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
                    with disk_full_errors("a shard", work, rows.size * np.dtype(dtype).itemsize):
                        write_rows(work / shard_name(index, split), rows.astype(dtype))
                record[split] = {"documents": len(texts) - n_empty, "empty_documents": n_empty,
                                 "source_tokens": int(len(ids)), "rows": int(len(rows))}
                record["carry"][split] = carry[split].tolist()
            done.append(record)
            manifest["shards"] = done
            with disk_full_errors("the resume manifest", work):
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
    skipped = sum((s.skipped for s in sources), Counter())
    if skipped:
        logger.warning("skipped %d records whose text is not a string: %s", sum(skipped.values()), dict(skipped))
    if sum(s["documents"] for s in splits.values()) == 0:
        discard_work(work)
        raise UsageError(f"{source_flag(args)}: the dataset is empty (no non-empty documents in "
                         f"{', '.join(labels)}{skipped_note(skipped)})")
    if splits["train"]["rows"] == 0:
        discard_work(work)
        raise UsageError(f"--context_length {args.context_length}: the training split holds only "
                         f"{splits['train']['source_tokens']} tokens, not one full row")
    for split, info in splits.items():
        logger.info("%s: %d documents -> %d rows of %d tokens; %d tail tokens dropped", split,
                    info["documents"], info["rows"], args.context_length, info["dropped_tail_tokens"])

    from datasets import DatasetDict

    # Only the shards this run's manifest lists (all of this configuration), never whatever lies in the folder.
    shards = {s: [work / shard_name(d["index"], s) for d in done if d[s]["rows"]] for s in split_names}
    missing = [p for paths in shards.values() for p in paths if not p.is_file()]
    if missing:
        discard_work(work)
        raise UsageError(f"--path_to_data_store {out}: shard {missing[0]} listed in the resume manifest is "
                         f"missing (removed by hand?); the work folder was discarded: run again")
    dataset = DatasetDict({s: split_dataset(paths, dtype) for s, paths in shards.items()})
    metadata = {
        "format": PRETRAIN_FORMAT, "tokenizer": args.hf_model_name,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer),
        "special_ids": asdict(specials), "context_length": args.context_length, "dtype": dtype,
        "splits": splits, "sources": labels, "seed": args.dataset_split_seed,
        "skipped_records": dict(skipped), "records": sum(s["documents"] + s["empty_documents"]
                                                         for s in splits.values()) + sum(skipped.values()),
        "test_split_pct": args.test_split_pct, "streaming": args.streaming,
        "document_separator": "eos", "created_by": "prepare_pretrain_data.py",
    }
    save_prepared(dataset, metadata, out, args.overwrite, sum(p.stat().st_size for v in shards.values() for p in v))
    discard_work(work)
    return metadata
