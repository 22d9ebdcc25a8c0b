"""Two CPU processes train a VLM on data that mixes image and text-only rows like one process does.

The rows are placed so that at every step one process's batch has an image and the other's has none: DDP must
not fail on the projector's unused weights, and ZeRO-3 must not hang or mismatch collectives when only one
process runs the vision tower (without `vision_sync` gloo reports "collective mismatch" at the first step).
"""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.integration.helpers import REPO, adapter, cpu_config, launch, losses, max_diff
from vlmtune.data.sampler import StepSampler
from vlmtune.testing.tiny_vlm import build_tiny_vlm

STEPS, SEED = 4, 7
STRATEGIES = {"ddp": "ddp over 2 process(es)", "zero3": "deepspeed over 2 process(es), ZeRO-3"}


@pytest.fixture(scope="module")
def vlm_recipe(tiny_vlm_root, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("vlm_dist")
    model = build_tiny_vlm("qwen2_vl", tiny_vlm_root / "qwen2_vl")
    shutil.copytree(REPO / "data/demo/vlm/images", tmp / "images")
    pictures = [r for r in json.loads((REPO / "data/demo/vlm/train.json").read_text()) if "image" in r]

    # Row i of the file is row i of the dataset; the sampler says which rank draws it at which step.
    sampler = StepSampler(2 * STEPS, micro_batch=1, grad_accum=1, world_size=2, seed=SEED)
    with_image = {sampler.micro_batches(step, step % 2)[0][0] for step in range(STEPS)}
    rows = [
        pictures[i]
        if i in with_image
        else {
            "conversations": [{"from": "human", "value": f"Count to {i}."}, {"from": "gpt", "value": "1 2 3"}]
        }
        for i in range(2 * STEPS)
    ]
    (tmp / "train.json").write_text(json.dumps(rows))
    recipe = {
        "model": {"path": str(model), "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        # A trainable projector gets no gradient from a text-only batch: DDP's unused-parameter case.
        "vision": {"tower": "frozen", "projector": "full"},
        "data": {"train": [{"path": str(tmp / "train.json"), "format": "llava"}], "max_length": 512},
        "train": {
            "output_dir": str(tmp / "unused"), "micro_batch_size": 1, "grad_accum": 1, "lr": 1.0e-3,
            "max_steps": STEPS, "warmup_ratio": 0.0, "mixed_precision": "no", "gradient_checkpointing": False,
            "log_every": 1, "report_to": [], "seed": SEED,
        },
        "checkpoint": {"every": 0, "keep_last": 1},
        "launch": {"accelerate_config": str(REPO / "accelerate_configs/cpu.yaml")},
    }  # fmt: skip
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def vlm_reference(vlm_recipe) -> Path:
    """One process, micro-batch 1 × accumulation 2: the same rows per step as 2 processes × 1 × 1."""
    out = vlm_recipe.parent / "single"
    launch(vlm_recipe, f"train.output_dir={out}", "train.grad_accum=2", procs=1)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_mixed_image_and_text_batches_across_two_processes(name, vlm_recipe, vlm_reference, tmp_path):
    out = tmp_path / "run"
    config = cpu_config(name, tmp_path)
    proc = launch(vlm_recipe, f"train.output_dir={out}", f"launch.accelerate_config={config}", procs=2)
    assert STRATEGIES[name] in proc.stderr
    assert "text-only batches run the vision tower" in proc.stderr
    assert losses(out) == pytest.approx(losses(vlm_reference), abs=1e-5)
    trained = adapter(out)
    assert any("merger" in k for k in trained)  # the projector is in the adapter, trained
    assert max_diff(trained, adapter(vlm_reference)) < 2e-5
    # Balanced ranks (data.balance_ranks, the default): one image row and one text row per step, so the image
    # row's process carries more tokens; the metric says how much.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rank_imbalance"] > 1.0 for r in records), records


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero3", "fsdp2"])
def test_a_sharded_vlm_teacher_stays_in_step_on_mixed_batches(name, vlm_recipe, tiny_vlm_root, tmp_path):
    """method: distill with a vision-language teacher sharded like the student: on the process whose batch has no
    image the teacher runs its vision tower too (as the student does), so the two processes neither hang nor
    mismatch collectives, and they distil like one process."""
    recipe = yaml.safe_load(vlm_recipe.read_text())
    teacher = build_tiny_vlm("qwen2_vl", tmp_path / "teacher", seed=1)
    recipe.update(method="distill", distill={"teacher": str(teacher), "dtype": "float32", "alpha": 0.5})
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(recipe))
    one, two = tmp_path / "one", tmp_path / "two"
    launch(path, f"train.output_dir={one}", "train.grad_accum=2", procs=1)
    config = cpu_config(name, tmp_path)
    proc = launch(path, f"train.output_dir={two}", f"launch.accelerate_config={config}", procs=2)
    assert "sharded like the student" in proc.stderr
    assert "text-only batches run the vision tower" in proc.stderr
    assert "the teacher runs its vision tower on text-only batches too" in proc.stderr
    for key in ("loss", "kd_loss", "ce_loss"):
        got = [json.loads(line)[key] for line in (two / "metrics.jsonl").read_text().splitlines()]
        want = [json.loads(line)[key] for line in (one / "metrics.jsonl").read_text().splitlines()]
        assert got == pytest.approx(want, abs=1e-5), key
    assert max_diff(adapter(two), adapter(one)) < 2e-5
