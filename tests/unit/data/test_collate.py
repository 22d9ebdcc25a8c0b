"""Batching: right padding, attention masks, and padding never trained."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from tests.unit.data.helpers import row, write_jsonl
from vlmtune.config.schema import DataConfig, DataSource
from vlmtune.data import Collator, build_dataset

PAD = 9
EXAMPLES = [
    {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
    {"input_ids": [4, 5, 6, 7, 8], "labels": [-100, -100, 6, 7, 8]},
]


def test_pads_right_with_masks_and_ignored_labels():
    batch = Collator(pad_token_id=PAD)(EXAMPLES)

    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[1, 2, 3, PAD, PAD], [4, 5, 6, 7, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, -100], [-100, -100, 6, 7, 8]]


def test_pad_to_multiple_of_rounds_the_length_up():
    batch = Collator(pad_token_id=PAD, pad_to_multiple_of=4)(EXAMPLES)

    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 5]
    assert (batch["labels"][:, 5:] == -100).all()
    assert Collator(pad_token_id=PAD, pad_to_multiple_of=5)(EXAMPLES)["input_ids"].shape == (2, 5)


def test_refuses_misaligned_labels_and_empty_batches():
    with pytest.raises(ValueError, match="3 input_ids but 2 labels"):
        Collator(pad_token_id=PAD)([{"input_ids": [1, 2, 3], "labels": [1, 2]}])
    with pytest.raises(ValueError, match="empty batch"):
        Collator(pad_token_id=PAD)([])


def test_batches_a_built_dataset_through_a_dataloader(tokenizer, tmp_path):
    path = write_jsonl(
        tmp_path / "a.jsonl", [row(1), {"messages": [*row(2)["messages"], *row(3)["messages"]]}]
    )
    dataset = build_dataset(
        [DataSource(path=str(path))], DataConfig(train=[DataSource(path=str(path))]), tokenizer, seed=0
    )

    batch = next(iter(DataLoader(dataset, batch_size=2, collate_fn=Collator(tokenizer.pad_token_id))))

    short, long = dataset.lengths
    assert batch["input_ids"].shape == (2, long)
    assert batch["input_ids"][0, short:].eq(tokenizer.pad_token_id).all()
    assert batch["labels"][0].ne(-100).sum() == sum(t != -100 for t in dataset[0]["labels"])
    assert batch["labels"][1].tolist() == dataset[1]["labels"]
