"""Fixtures of the multi-process tests."""

from pathlib import Path

import pytest
import yaml

from tests.integration.helpers import CONFIGS, REPO


@pytest.fixture(scope="module")
def recipe_file(tiny_model_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dist")
    recipe = {
        "model": {"path": str(tiny_model_dir), "dtype": "float32"},
        # No dropout and a small lr: Adam would magnify float noise in near-zero gradients into visible differences.
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": [{"path": str(REPO / "data/demo/train.jsonl")}], "max_length": 256},
        "train": {
            "output_dir": str(tmp / "unused"), "micro_batch_size": 2, "grad_accum": 2, "lr": 1.0e-3,
            "max_steps": 6, "warmup_ratio": 0.0, "mixed_precision": "no", "gradient_checkpointing": False,
            "log_every": 1, "report_to": [],
        },
        "checkpoint": {"every": 3, "keep_last": 3},
        "launch": {"accelerate_config": str(CONFIGS / "cpu.yaml")},
    }  # fmt: skip
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path
