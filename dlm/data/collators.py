"""Batching prepared rows: SFT rows are padded with EOS. Packed pretraining rows all have one length, so
transformers' `default_data_collator` (a stack into a LongTensor) batches them; nothing of ours is needed."""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
