"""Batching prepared rows: SFT rows are padded with EOS; eval rows keep their index. Packed pretraining rows
all have one length, so transformers' `default_data_collator` (a stack into a LongTensor) batches them."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class SFTCollator:
    """Pad SFT rows to the longest in the batch with EOS; for the training loss the padding is answer.

    The model must learn to fill the tail of the canvas with EOS after the answer, which is exactly
    what sampling asks of it, so in training the pads are answer tokens, attended to like any other.
    `is_padding` marks them, because a reported figure must not depend on the batch: evaluation
    (the Trainer's eval loss and evaluate.py) neither attends to nor scores the padding, so a row's
    scored region is its own answer (every assistant turn and its end-of-turn), whatever its neighbours.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 8, pad_to_length: int | None = None):
        self.pad_id = pad_id
        self.multiple = pad_to_multiple_of
        self.pad_to_length = pad_to_length  # LLaDA style: every row padded to a fixed canvas

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        import torch

        longest = max([len(f["input_ids"]) for f in features] + [self.pad_to_length or 0])
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


def longest_final_answer(dataset) -> int:
    """Tokens in the longest final answer (last assistant turn + its end-of-turn) of a prepared SFT split.

    This is the canvas SFT taught the model to fill: every batch padded the answers with EOS only up to
    its longest row, so a generated region much longer than this was never seen in training.
    """
    import numpy as np
    import pyarrow.compute as pc

    longest = 0
    for batch in dataset.with_format("arrow").iter(batch_size=8192):
        masks = batch.column("answer_mask").combine_chunks()
        lengths = pc.list_value_length(masks).to_numpy(zero_copy_only=False)
        values = pc.list_flatten(masks).to_numpy(zero_copy_only=False)
        keep = lengths > 0
        ends = np.cumsum(lengths)[keep]
        starts = ends - lengths[keep]
        # The final answer is the run of answer tokens that ends the row: it starts after the last 0.
        last_zero = np.maximum.reduceat(np.where(values == 0, np.arange(len(values)), -1), starts)
        if len(ends):
            longest = max(longest, int((ends - np.maximum(last_zero + 1, starts)).max()))
    return longest


class RowIndexed:
    """A dataset view whose rows carry their index (`row_index`), for per-row evaluation noise."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i], "row_index": i}


class KeepRowIndex:
    """Wraps a collator so that `row_index` (from `RowIndexed`) survives batching as a LongTensor."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        import torch

        if not features or "row_index" not in features[0]:
            return self.collate(features)
        batch = self.collate([{k: v for k, v in f.items() if k != "row_index"} for f in features])
        batch["row_index"] = torch.tensor([f["row_index"] for f in features], dtype=torch.long)
        return batch
