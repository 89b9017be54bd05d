"""SFT data: records (Alpaca, OpenOrca, messages, ShareGPT) -> chat messages -> rendered ids with an answer mask."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dlm.data.sources import (RECORD_EXTENSIONS, PrepareArguments, check_common_args, check_context_fits_model,
                              columns_error, expand_data_files, iter_located_records, source_flag, split_name,
                              type_name)
from dlm.data.packing import text_pieces
from dlm.data.split import test_assignment
from dlm.data.storage import SFT_FORMAT, disk_full_errors, prepare_locked, save_prepared
from dlm.errors import UsageError

logger = logging.getLogger(__name__)

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
class SFTDataArguments(PrepareArguments):
    """Flags of prepare_sft_data.py (reference recipe names first, Hugging Face names as aliases)."""

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
            raise columns_error(flag, where, column, columns, f" for the {fmt} format")
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


# Fields each format reads as text: (field, may be null or missing); list formats name their turns' keys.
TEXT_FIELDS = {"alpaca": (("instruction", False), ("output", False), ("input", True)),
               "openorca": (("question", False), ("response", False), ("system_prompt", True))}
TURN_FIELDS = {"messages": ("role", "content"), "sharegpt": ("from", "value")}


def record_problem(record: dict, fmt: str) -> str | None:
    """Why a record of format `fmt` cannot be rendered as text (a field of the wrong type), or None."""
    for name, optional in TEXT_FIELDS.get(fmt, ()):
        value = record.get(name)
        if name not in record and not optional:
            return f"field {name!r} is missing"
        if not isinstance(value, str) and not (optional and value is None):
            return f"field {name!r} is {type_name(value)}, not a string"
    if fmt in TURN_FIELDS:
        column = SFT_COLUMNS[fmt][0][0]
        turns = record.get(column)
        if not isinstance(turns, list):
            return f"field {column!r} is {type_name(turns)}, not a list of turns"
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                return f"{column}[{i}] is {type_name(turn)}, not an object"
            for key in TURN_FIELDS[fmt]:
                if not isinstance(turn.get(key), str):
                    return f"{column}[{i}].{key} is {type_name(turn.get(key))}, not a string"
            from dlm.tokenization import ROLES  # here, not above: that module loads torch (2 s)

            if fmt == "messages" and turn["role"] not in ROLES:
                return f"{column}[{i}].role is {turn['role']!r}, not one of {', '.join(ROLES)}"
    return None


def check_records(located: Iterable[tuple[str, dict]], fmt: str, skipped: Counter | None) -> list[dict]:
    """The records that render as text; a bad one is an error naming its place and field, or, when a
    `skipped` counter is given, counted there by reason and left out."""
    kept = []
    for where, record in located:
        problem = record_problem(record, fmt)
        if problem is None:
            kept.append(record)
        elif skipped is None:
            raise UsageError(f"{where}: {problem} (pass --skip_bad_records to skip such records, counted in "
                             f"metadata.json)")
        else:
            skipped[problem] += 1
    return kept


def encode_sft_batch(tokenizer, chats: Sequence[Sequence[dict]]) -> tuple[list[list[int]], list[np.ndarray]]:
    """Ids (exactly `encode_chat` of each chat) and answer masks for a batch of chats.

    The mask is 1 on each assistant turn's content and its end-of-turn (the template's {% generation %}
    block). Record text is text: `[MASK]` or `<|eot|>` written in a record is ordinary tokens, never the
    special ids (`dlm.tokenization.encode_chats`).
    """
    from dlm.tokenization import encode_chats  # here, not above: that module loads torch (2 s)

    ids, masks = encode_chats(tokenizer, chats)
    return ids, [np.asarray(m, dtype=np.uint8) for m in masks]


def max_token_chars(tokenizer) -> int:
    """An upper bound on the characters one token covers: the longest vocabulary entry (in bytes for byte-level
    BPE, so at least the characters), or 100 where an unknown token may stand for a whole word."""
    longest = max(len(t) for t in tokenizer.get_vocab())
    return max(longest, 100) if tokenizer.unk_token is not None else longest


def cut_chat(chat: Sequence[dict], budget: int) -> list[dict]:
    """The chat cut after about `budget` characters of content (between words, the rest dropped): its
    rendering starts like the whole chat's, so its first tokens are the same, without tokenizing the rest."""
    out, used = [], 0
    for message in chat:
        if used + len(message["content"]) > budget:
            out.append({**message, "content": next(text_pieces(message["content"], max(budget - used, 2)))})
            break
        out.append(message)
        used += len(message["content"])
    return out


def _load_sft_records(args: SFTDataArguments, skipped: Counter | None):
    """The source records as a `datasets.Dataset`, a label for metadata and messages, and the format.

    Local records whose fields do not render as text are an error, or counted in `skipped` and left out.
    """
    if args.data_files:  # parsed and checked before `datasets` is imported, so bad files fail fast
        paths = expand_data_files(args.data_files, allowed=RECORD_EXTENSIONS)
        located = [(f"--data_files {path} {where}", record) for path in paths
                   for where, record in iter_located_records(path)]
        label = ",".join(str(p) for p in paths)
        if not located:
            raise UsageError(f"--data_files {label}: the dataset is empty (no records)")
        columns = set().union(*(r.keys() for _, r in located))
        fmt = detect_format(columns, args.format, where=label)
        records = check_records(located, fmt, skipped)
        if not records:
            raise UsageError(f"--data_files {label}: no usable record (skipped: {dict(skipped)})")
        wanted = [c for c in (*SFT_COLUMNS[fmt][0], *SFT_COLUMNS[fmt][1]) if c in columns]
        from datasets import Dataset
        # Only the columns the format reads: other columns may hold values Arrow cannot unify.
        return Dataset.from_list([{c: r.get(c) for c in wanted} for r in records]), label, fmt
    from datasets import load_dataset

    spec = args.dataset or DEFAULT_SFT_DATASET
    name, config = split_name(spec)
    try:
        ds = load_dataset(name, config, split=args.dataset_split, cache_dir=args.huggingface_cache_dir)
    except Exception as err:  # connection, missing config or split: datasets raises many types
        raise UsageError(f"--dataset {spec}: cannot load split {args.dataset_split!r} "
                         f"({str(err).splitlines()[0]})") from None
    if len(ds) == 0:
        raise UsageError(f"--dataset {spec}: the dataset is empty")
    fmt = detect_format(ds.column_names, args.format, where=spec, flag="--dataset")
    bad = _hub_bad_rows(ds, fmt)
    if bad:
        check_records([(f"--dataset {spec} record {i}", ds[i]) for i in bad], fmt, skipped)
        ds = ds.select(sorted(set(range(len(ds))) - set(bad)))
    return ds, spec, fmt


def _hub_bad_rows(ds, fmt: str) -> list[int]:
    """Rows of a hub dataset that do not render as text: none when the Arrow types and null counts say so,
    else found by one pass over the rows."""
    if fmt in TEXT_FIELDS and all(
            name not in ds.features or (getattr(ds.features[name], "dtype", None) in ("string", "large_string")
                                        and (optional or ds.data.column(name).null_count == 0))
            for name, optional in TEXT_FIELDS[fmt]):
        return []
    return [i for i, r in enumerate(ds) if record_problem(r, fmt)]


def prepare_sft(args: SFTDataArguments) -> dict:
    """Build the SFT DatasetDict (input_ids, answer_mask, length) described by `args`; return its metadata.

    Each record becomes a chat, rendered with the tokenizer's chat template; `answer_mask` is 1 on
    every assistant turn's tokens and its end-of-turn token. Over-long samples are dropped or
    truncated per `--overlong`, with counts in the metadata.
    """
    return prepare_locked(args, _prepare_sft)


def _prepare_sft(args: SFTDataArguments, out: Path) -> dict:
    check_common_args(args)
    skipped = Counter() if args.skip_bad_records else None
    records, label, fmt = _load_sft_records(args, skipped)
    if skipped:
        logger.warning("skipped %d records that do not render as text: %s", sum(skipped.values()), dict(skipped))

    from datasets import DatasetDict, Features, List, Value

    from dlm.tokenization import load_mlm_tokenizer, smallest_uint_dtype, special_ids, tokenizer_fingerprint

    tokenizer = load_mlm_tokenizer(args.hf_model_name, trust_remote_code=args.trust_remote_code)
    check_context_fits_model(args)
    specials = special_ids(tokenizer)
    dtype = smallest_uint_dtype(len(tokenizer))
    limit, truncate = args.context_length, args.overlong == "truncate"
    # A chat with more content characters than this has more than `limit` tokens for sure: it is dropped
    # (or cut, with --overlong truncate) before tokenizing, which for a 50 MB record would need ~10 GB.
    char_bound = (limit + 1) * max_token_chars(tokenizer)

    def encode(batch: dict) -> dict:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        chats = [record_to_messages(r, fmt) for r in rows]
        huge = [sum(len(m["content"]) for m in chat) > char_bound for chat in chats]
        ids, masks = encode_sft_batch(tokenizer, [cut_chat(c, 2 * char_bound) if h else c
                                                  for c, h in zip(chats, huge) if truncate or not h])
        ids, masks = iter(ids), iter(masks)
        out_ids, out_masks, lengths, overlong, no_answer, answer_cut = [], [], [], [], [], []
        for chat, h in zip(chats, huge):
            if h and not truncate:  # over-long for sure: dropped, never tokenized
                seq, mask = [], np.zeros(0, dtype=np.uint8)
            else:
                seq, mask = next(ids), next(masks)
            too_long = h or len(seq) > limit
            no_answer.append(not any(m["role"] == "assistant" for m in chat))  # (an empty answer has its EOT)
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
    # A hub dataset's map writes its result beside the dataset's cache files (local records stay in memory).
    cache = Path(records.cache_files[0]["filename"]).parent if records.cache_files else "the datasets cache"
    with disk_full_errors("the tokenized records", cache):
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
                         if n_dropped_overlong else f"{source_flag(args)} {label}: no record has an answer")
    is_test = test_assignment(len(kept), args.test_split_pct, args.dataset_split_seed)
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
        "records": len(records) + sum((skipped or {}).values()), "skipped_no_answer": int(no_answer.sum()),
        "skipped_records": dict(skipped or {}), "created_by": "prepare_sft_data.py",
    }
    save_prepared(dataset, metadata, out, args.overwrite, sum(d.data.nbytes for d in dataset.values()))
    logger.info("train %d / test %d samples (%s format); %d dropped, %d truncated as over-long",
                splits["train"]["rows"], splits["test"]["rows"], fmt, n_dropped_overlong, n_truncated)
    return metadata
