"""Batching prepared rows: packed pretraining rows are stacked, SFT rows are padded with EOS."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class PretrainCollator:
    """Stack packed rows (all the same length) into a LongTensor batch."""

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        import torch

        return {"input_ids": torch.as_tensor([f["input_ids"] for f in features], dtype=torch.long)}


class SFTCollator:
    """Pad SFT rows to the longest in the batch with EOS; for the training loss the padding is answer.

    The model must learn to fill the tail of the canvas with EOS after the answer, which is exactly
    what sampling asks of it, so in training the pads are answer tokens, attended to like any other.
    `is_padding` marks them, because a reported figure must not depend on the batch: evaluation
    (the Trainer's eval loss and evaluate.py) neither attends to nor scores the padding, so a row's
    scored region is its own answer (every assistant turn and its end-of-turn), whatever its neighbours.
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
        padding = torch.ones((len(features), width), dtype=torch.bool)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            answer[row, :n] = torch.as_tensor(f["answer_mask"], dtype=torch.bool)
            padding[row, :n] = False
        return {"input_ids": ids, "answer_mask": answer, "is_padding": padding}
