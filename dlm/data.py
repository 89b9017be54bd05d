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
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dlm.cli import UsageError

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


class PretrainCollator:
    """Stack packed rows (all the same length) into a LongTensor batch."""

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
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
        longest = max(len(f["input_ids"]) for f in features)
        width = -(-longest // self.multiple) * self.multiple
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        answer = torch.ones((len(features), width), dtype=torch.bool)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            answer[row, :n] = torch.as_tensor(f["answer_mask"], dtype=torch.bool)
        return {"input_ids": ids, "answer_mask": answer}
