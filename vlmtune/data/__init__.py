"""The data pipeline, one for text and image-text rows: sources → formats → encoder (chat template, label masks,
image tokens from header sizes) → indexed, weighted dataset → batches (images decoded as they are collated)."""

from vlmtune.data.collate import Collator, PairCollator, PromptCollator
from vlmtune.data.dataset import DataStats, IndexedDataset, build_dataset
from vlmtune.data.encode import IGNORE_INDEX, Encoder

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "DataStats",
    "Encoder",
    "IndexedDataset",
    "PairCollator",
    "PromptCollator",
    "build_dataset",
]
