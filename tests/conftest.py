"""Test-wide settings: offline, deterministic, small. Fixtures build a tiny random-init model once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tokenisation cache of this test session (subprocesses inherit it): never the user's ~/.cache.
if "VLMTUNE_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["VLMTUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="vlmtune-test-cache-")
    atexit.register(shutil.rmtree, os.environ["VLMTUNE_CACHE_DIR"], ignore_errors=True)

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from vlmtune.testing import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("models") / "tiny-llm")


@pytest.fixture
def tiny_recipe(tiny_model_dir, tmp_path):
    """A factory for a small CPU recipe (as a mapping) on the demo data; keyword sections are merged in."""

    def make(**sections) -> dict:
        recipe = {
            "model": {"path": str(tiny_model_dir), "dtype": "float32"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {
                "train": [{"path": str(REPO / "data/demo/train.jsonl")}],
                "max_length": 256,
            },
            "train": {
                "output_dir": str(tmp_path / "run"),
                "micro_batch_size": 4,
                "grad_accum": 1,
                "lr": 1.0e-2,
                "max_steps": 6,
                "warmup_ratio": 0.0,
                "mixed_precision": "no",
                "gradient_checkpointing": False,
                "log_every": 1,
                "report_to": [],
            },
            "checkpoint": {"every": 0, "keep_last": 2},
            "launch": {"accelerate_config": str(REPO / "accelerate_configs/cpu.yaml")},
        }
        for section, values in sections.items():
            if isinstance(values, dict) and isinstance(recipe.get(section), dict):
                recipe[section] = {**recipe[section], **values}
            else:
                recipe[section] = values
        return recipe

    return make


@pytest.fixture(scope="session")
def tiny_vlm_root(tmp_path_factory) -> Path:
    """One folder of tiny VLMs for the whole session: each family is built once (builds are cached there)."""
    return tmp_path_factory.mktemp("tiny_vlms")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared machine they lose to oversubscription."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
