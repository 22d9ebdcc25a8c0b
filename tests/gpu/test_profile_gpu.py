"""On a CUDA machine: `vlmtune profile` against the plan, and `train.micro_batch_size: auto` with its probe
(skipped without one)."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from vlmtune.profile import profile_recipe
from vlmtune.train import run

pytestmark = pytest.mark.gpu

TOLERANCE = 0.10


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_profile_agrees_with_the_plan_on_cuda(tiny_recipe, precision):
    recipe = tiny_recipe(
        train={"mixed_precision": precision, "micro_batch_size": 8, "grad_accum": 2},
        launch={"accelerate_config": None},
    )
    profile = profile_recipe(recipe, steps=3)
    assert profile.device.startswith("cuda")
    measured, estimate = profile.measured, profile.estimate
    # The allocator's peak, against the plan without the CUDA context (outside the allocator).
    assert abs(estimate["total"] - measured["total"]) <= TOLERANCE * measured["total"], (estimate, measured)
    assert profile.outside_plan < 256 << 20  # cuBLAS workspaces: measured, but not in the total
    assert profile.units["decoder block 0"]["forward_s"] > 0
    snapshot = Path(profile.files["memory_snapshot"])
    assert snapshot.name == "memory_snapshot.pickle"
    assert "segments" in pickle.loads(snapshot.read_bytes())  # what pytorch.org/memory_viz reads


def test_auto_micro_batch_is_probed_on_cuda(tiny_recipe, caplog):
    recipe = tiny_recipe(
        train={
            "micro_batch_size": "auto",
            "global_batch_size": 16,
            "max_steps": 2,
            "mixed_precision": "bf16",
        },
        launch={"accelerate_config": None},
    )
    caplog.set_level(logging.INFO)
    result = run(recipe)
    train = yaml.safe_load((result.output_dir / "recipe.yaml").read_text())["train"]
    assert train["micro_batch_size"] * train["grad_accum"] == 16
    assert "probe: 16 ok" in caplog.text  # the tiny model fits the whole global batch on any GPU


def test_probe_steps_down_on_a_real_out_of_memory(tiny_recipe, monkeypatch):
    """A budget far below what a micro-batch needs: the probe's passes run out of memory for real and it steps
    down to the size that fits, with the memory of each failed try given back."""
    import vlmtune.plan.probe as probe_module

    free, _ = torch.cuda.mem_get_info()
    # Fill the GPU but for ~40 MiB: 64 rows of the tiny model at 256 tokens need more, 1 row much less.
    filler = torch.empty(max(free - (40 << 20), 0), dtype=torch.uint8, device="cuda")
    try:
        recipe = tiny_recipe(
            train={"micro_batch_size": "auto", "max_steps": 1, "grad_accum": 1, "mixed_precision": "no"},
            data={"max_length": 256},
            launch={"accelerate_config": None},
        )
        monkeypatch.setattr("vlmtune.plan.autobatch.planner_largest", lambda *a: 64)
        seen = []
        original = probe_module.cuda_probe

        def recording(*args, **kwargs):
            inner = original(*args, **kwargs)

            def probe(n):
                ok = inner(n)
                seen.append((n, ok, torch.cuda.memory_allocated()))
                return ok

            return probe

        monkeypatch.setattr(probe_module, "cuda_probe", recording)
        result = run(recipe)
    finally:
        del filler
        torch.cuda.empty_cache()
    assert seen[0][:2] == (64, False) and any(ok for _, ok, _ in seen), seen
    # Nothing of a failed try stays allocated: the memory after each try is what it was before the first.
    assert max(m for _, _, m in seen) - min(m for _, _, m in seen) < 1 << 20
    train = yaml.safe_load((result.output_dir / "recipe.yaml").read_text())["train"]
    assert 1 <= train["micro_batch_size"] < 64
