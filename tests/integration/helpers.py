"""Shared by the multi-process tests: CPU versions of the shipped accelerate configs, launching, reading results."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "accelerate_configs"


def tiny_recipe_for_processes(
    model_dir: Path, output_dir: Path, *, grad_accum: int, max_steps: int, checkpoint: dict
) -> dict:
    """The tiny model on the demo data, 2 rows per micro-batch, fp32: what the multi-process tests compare."""
    return {
        "model": {"path": str(model_dir), "dtype": "float32"},
        # No dropout and a small lr: Adam would magnify float noise in near-zero gradients into visible differences.
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": [{"path": str(REPO / "data/demo/train.jsonl")}], "max_length": 256},
        "train": {
            "output_dir": str(output_dir), "micro_batch_size": 2, "grad_accum": grad_accum, "lr": 1.0e-3,
            "max_steps": max_steps, "warmup_ratio": 0.0, "mixed_precision": "no", "gradient_checkpointing": False,
            "log_every": 1, "report_to": [],
        },
        "checkpoint": checkpoint,
        "launch": {"accelerate_config": str(CONFIGS / "cpu.yaml")},
    }  # fmt: skip


def cpu_config(name: str, out_dir: Path, processes: int = 2) -> Path:
    """The shipped config `name`, for `processes` CPU processes in fp32."""
    cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    cfg.update(num_processes=processes, mixed_precision="no")
    cfg.pop("gpu_ids", None)
    path = out_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    recipe: Path, *overrides: str, procs: int, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions"))
    cmd = [sys.executable, "-m", "vlmtune.cli", "launch", str(recipe), *overrides]
    cmd += ["--procs-per-node", str(procs), "--main-port", str(free_port()), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter/adapter_model.safetensors"))


def max_diff(x: dict, y: dict) -> float:
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def crash_in_step(monkeypatch, recipe: dict, step: int) -> None:
    """Run `recipe` in this process until a simulated crash at the start of optimizer step `step` (1-based).

    The run's checkpoints and logs stay as the crash left them; rerunning the recipe resumes it.
    """
    import pytest

    from vlmtune.engine.loop import Trainer
    from vlmtune.train import run

    original = Trainer.train_step

    def crashing(self, micro_batches):
        if self.state.step == step - 1:
            raise RuntimeError("simulated crash")
        return original(self, micro_batches)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", crashing)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(recipe)


def count_4bit_forwards(monkeypatch) -> list[int]:
    """A one-element list counting the bitsandbytes 4-bit layer forwards from now on (proof a run is on 4-bit)."""
    import bitsandbytes as bnb

    calls, forward = [0], bnb.nn.Linear4bit.forward

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", counted)
    return calls
