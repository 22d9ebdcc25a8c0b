"""Fixtures for the data tests. Everything is local: no Hub access, and datasets caches under a temp folder."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import datasets  # after the offline switches, which datasets reads at import
import pytest
from transformers import PreTrainedTokenizerFast

from tests.unit.data.helpers import build_tokenizer


@pytest.fixture(scope="session", autouse=True)
def _datasets_cache(tmp_path_factory: pytest.TempPathFactory):
    """Keep `load_dataset`'s Arrow cache out of the user's home directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets_cache")))
        yield


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE with a ChatML template (tests must not modify it; build their own instead)."""
    return build_tokenizer()
