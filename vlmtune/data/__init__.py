"""The text data pipeline: sources → formats → chat template and label masks → weighted dataset → batches."""

from vlmtune.data.collate import Collator
from vlmtune.data.dataset import DataStats, TokenizedDataset, build_dataset

__all__ = ["Collator", "DataStats", "TokenizedDataset", "build_dataset"]
