"""`train.micro_batch_size: auto` end to end on the CPU: the planner sizes it, the run folder's recipe.yaml records
it, and a resumed run keeps it even when the planner would now choose otherwise."""

from __future__ import annotations

import json

import yaml

import vlmtune.plan.autobatch as autobatch
from vlmtune.config.load import load_recipe
from vlmtune.plan import plan_recipe
from vlmtune.train import run


def test_auto_micro_batch_is_chosen_recorded_and_kept_on_resume(tiny_recipe, one_thread, monkeypatch, caplog):
    recipe = tiny_recipe(
        train={"micro_batch_size": "auto", "global_batch_size": 8, "grad_accum": 3, "max_steps": 2},
        checkpoint={"every": 1, "keep_last": 2},
    )
    # The planner on this machine's RAM fits far more than 8 rows: capped at the global batch, accumulation 1.
    caplog.set_level("INFO")
    result = run(recipe)
    resolved = yaml.safe_load((result.output_dir / "recipe.yaml").read_text())["train"]
    assert (resolved["micro_batch_size"], resolved["grad_accum"], resolved["global_batch_size"]) == (8, 1, 8)
    assert "batch sizes: train.micro_batch_size=8 train.grad_accum=1 (planner:" in caplog.text
    state = json.loads((result.output_dir / "checkpoints/step-2/trainer_state.json").read_text())
    assert state["global_batch"] == 8

    # Now the planner would fit 2 rows: a fresh run would train 2 × 4, the resumed one keeps 8 × 1.
    monkeypatch.setattr(autobatch, "planner_largest", lambda recipe, world, memory: 2)
    fresh = tiny_recipe(
        train={
            "micro_batch_size": "auto",
            "global_batch_size": 8,
            "max_steps": 1,
            "output_dir": str(result.output_dir.parent / "fresh"),
        },
    )
    fresh_resolved = yaml.safe_load((run(fresh).output_dir / "recipe.yaml").read_text())["train"]
    assert (fresh_resolved["micro_batch_size"], fresh_resolved["grad_accum"]) == (2, 4)
    caplog.clear()
    recipe["train"]["max_steps"] = 3
    resumed = run(recipe)
    assert resumed.steps == 3
    kept = yaml.safe_load((resumed.output_dir / "recipe.yaml").read_text())["train"]
    assert (kept["micro_batch_size"], kept["grad_accum"]) == (8, 1)
    assert "kept from" in caplog.text and "resuming with global batch" not in caplog.text


def test_plan_sizes_an_auto_micro_batch(tiny_recipe, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(train={"micro_batch_size": "auto"})))
    recipe = load_recipe(path)
    plan = plan_recipe(recipe, gpu_mem_gib=1.2)
    fixed = plan_recipe(load_recipe(path, ["train.micro_batch_size=1"]), gpu_mem_gib=1.2)
    assert plan.micro_batch == fixed.largest_micro_batch > 1
    assert plan.fits and "train.micro_batch_size auto: planned at" in plan.notes[0]
