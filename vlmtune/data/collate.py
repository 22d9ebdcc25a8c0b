"""Batching: right-pad tokenised examples into tensors."""

from __future__ import annotations

import torch

from vlmtune.data.dataset import IGNORE_INDEX


class Collator:
    """Pads a list of examples into `input_ids`, `attention_mask` and `labels` tensors.

    Padding goes on the right, with labels -100 there so padding is never trained.

    Args:
        pad_token_id: Id written into padded positions of `input_ids` (masked out by `attention_mask`).
        pad_to_multiple_of: Round the batch length up to a multiple of this (tensor-core friendly shapes).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: the tokenizer has no pad token; set one before batching")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict[str, torch.LongTensor]:
        """Pad `examples` (each with `input_ids` and `labels` of equal length) into one batch."""
        if not examples:
            raise ValueError("cannot collate an empty batch")
        length = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            if len(example["labels"]) != n:
                raise ValueError(f"example {row} has {n} input_ids but {len(example['labels'])} labels")
            input_ids[row, :n] = torch.as_tensor(example["input_ids"], dtype=torch.long)
            attention_mask[row, :n] = 1
            labels[row, :n] = torch.as_tensor(example["labels"], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
