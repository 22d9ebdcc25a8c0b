"""Two CPU processes (gloo DDP) train exactly like one process with the same global batch, and resume."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]


def _launch(recipe: Path, *args: str, processes: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    if processes > 1:
        # On CPU accelerate starts N synchronised gloo processes only with --multi_gpu plus ACCELERATE_USE_CPU.
        env["ACCELERATE_USE_CPU"] = "true"
        cmd.append("--multi_gpu")
    cmd += ["--num_cpu_threads_per_process", "1", "-m", "vlmtune.train", str(recipe), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _max_diff(a: Path, b: Path) -> float:
    x, y = (load_file(str(p / "adapter/adapter_model.safetensors")) for p in (a, b))
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_and_resumes(tiny_recipe, tmp_path):
    recipe = tmp_path / "r.yaml"
    # A small lr keeps Adam from magnifying float noise in near-zero gradients into visible weight differences.
    r = tiny_recipe(lora={"dropout": 0.0}, train={"lr": 1e-3}, checkpoint={"every": 3, "keep_last": 3})
    recipe.write_text(yaml.safe_dump(r))
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _launch(
        recipe, f"train.output_dir={single}", "train.micro_batch_size=4", "train.grad_accum=2", processes=1
    )
    proc = _launch(
        recipe, f"train.output_dir={ddp}", "train.micro_batch_size=2", "train.grad_accum=2", processes=2
    )
    assert "global batch 8 = 2 micro × 2 accum × 2 processes" in proc.stderr
    assert proc.stderr.count("saved checkpoint") == 2  # rank 0 alone reports
    assert _losses(single) == pytest.approx(_losses(ddp), abs=1e-5)
    assert _max_diff(single, ddp) < 2e-5
    assert sorted(p.name for p in (ddp / "checkpoints/step-6/rng").iterdir()) == ["rank-0.pt", "rank-1.pt"]

    # Lose everything after step 3, as a crash would, and resume with the same two processes.
    final = {k: v.clone() for k, v in load_file(str(ddp / "adapter/adapter_model.safetensors")).items()}
    shutil.rmtree(ddp / "checkpoints/step-6")
    shutil.rmtree(ddp / "adapter")
    proc = _launch(
        recipe, f"train.output_dir={ddp}", "train.micro_batch_size=2", "train.grad_accum=2", processes=2
    )
    assert "resumed from" in proc.stderr and "at step 3" in proc.stderr
    resumed = load_file(str(ddp / "adapter/adapter_model.safetensors"))
    assert max((final[k] - resumed[k]).abs().max().item() for k in final) < 1e-6
    assert _losses(ddp) == pytest.approx(_losses(single), abs=1e-5)
    assert torch.isfinite(torch.cat([t.flatten() for t in resumed.values()])).all()
