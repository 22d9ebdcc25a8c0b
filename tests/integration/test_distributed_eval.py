"""Evaluation under sharding: two processes' eval losses and sample answers equal one process's, and generation
under ZeRO-3 / FSDP2 (where every forward gathers parameters from every rank) finishes."""

import json
from pathlib import Path

import pytest
import yaml

from tests.integration.helpers import REPO, cpu_config, launch, tiny_recipe_for_processes


@pytest.fixture(scope="module")
def eval_recipe(tiny_model_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dist-eval")
    recipe = tiny_recipe_for_processes(
        tiny_model_dir, tmp / "unused", grad_accum=1, max_steps=2, checkpoint={"every": 0, "keep_last": 1}
    )
    recipe["data"]["eval"] = [{"path": str(REPO / "data/demo/eval.jsonl")}]  # 40 rows: 14 batches of 3
    recipe["train"].update(eval_every=1, eval_micro_batch_size=3, eval_samples=2, eval_max_new_tokens=4)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def eval_reference(eval_recipe) -> Path:
    """One process, micro-batch 4: the global batch of 2 processes × 2."""
    out = eval_recipe.parent / "single"
    launch(eval_recipe, f"train.output_dir={out}", "train.micro_batch_size=4", procs=1)
    return out


def _evals(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in records if "eval_loss" in r]


def _samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero3", "fsdp2"])
def test_sharded_evaluation_and_samples_match_one_process(name, eval_recipe, eval_reference, tmp_path):
    out = tmp_path / "run"
    launch(
        eval_recipe,
        f"train.output_dir={out}",
        f"launch.accelerate_config={cpu_config(name, tmp_path)}",
        procs=2,
    )
    assert len(_evals(eval_reference)) == 2
    assert _evals(out) == pytest.approx(_evals(eval_reference), abs=1e-5)
    # Written once (rank 0), and the same greedy answers as one process gives.
    assert [s["step"] for s in _samples(out)] == [1, 1, 2, 2]
    assert _samples(out) == _samples(eval_reference)
