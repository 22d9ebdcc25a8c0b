"""Two CPU processes (gloo) under each shipped sharding config train like one process with the same global batch,
save a complete, standard adapter, and resume exactly.

Launched through `vlmtune launch`, from the shipped accelerate configs with only the process count and precision
changed for CPU, so the configs users get are the ones tested.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.helpers import REPO, adapter, cpu_config, free_port, launch, losses, max_diff

# config file → what the run must report after prepare()
STRATEGIES = {
    "ddp": "ddp over 2 process(es)",
    "zero2": "deepspeed over 2 process(es), ZeRO-2",
    "zero3": "deepspeed over 2 process(es), ZeRO-3",
    "zero3_offload": "deepspeed over 2 process(es), ZeRO-3",
    "fsdp2": "fsdp2 over 2 process(es)",
}


@pytest.fixture(scope="module")
def reference(recipe_file) -> Path:
    """One process, micro-batch 4 × accumulation 2: the same global batch of 8 as 2 processes × 2 × 2."""
    out = recipe_file.parent / "single"
    launch(recipe_file, f"train.output_dir={out}", "train.micro_batch_size=4", procs=1)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_two_processes_match_one_and_resume_exactly(name, recipe_file, reference, tmp_path):
    config = cpu_config(name, tmp_path)
    out = tmp_path / "run"
    args = (f"train.output_dir={out}", f"launch.accelerate_config={config}")
    proc = launch(recipe_file, *args, "train.gradient_checkpointing=true", procs=2)
    assert STRATEGIES[name] in proc.stderr
    assert "global batch 8 = 2 micro × 2 accum × 2 processes" in proc.stderr
    assert proc.stderr.count("saved checkpoint") == 2  # rank 0 alone reports

    # Same losses and adapter as one process; the adapter is complete (gathered from shards) and standard.
    assert losses(out) == pytest.approx(losses(reference), abs=1e-5)
    final = adapter(out)
    assert max_diff(final, adapter(reference)) < 2e-5
    assert all(t.numel() > 0 for t in final.values())
    ckpt = out / "checkpoints/step-6"
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank-0.pt", "rank-1.pt"]
    assert json.loads((ckpt / "COMPLETE").read_text())["world_size"] == 2

    # Lose everything after step 3, as a crash would, and resume with the same two processes.
    shutil.rmtree(ckpt)
    shutil.rmtree(out / "adapter")
    proc = launch(recipe_file, *args, "train.gradient_checkpointing=true", procs=2)
    assert "resumed from" in proc.stderr and "at step 3" in proc.stderr
    assert max_diff(adapter(out), final) < 1e-6
    assert losses(out) == pytest.approx(losses(reference), abs=1e-5)

    if name == "zero2":  # per-rank shards: another process count is refused, and nothing is damaged
        shutil.rmtree(out / "checkpoints/step-6")
        one = cpu_config(name, tmp_path / "one", processes=1) if (tmp_path / "one").mkdir() is None else None
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "vlmtune.cli", "launch", str(recipe_file), f"train.output_dir={out}"]
        cmd += [f"launch.accelerate_config={one}", "--procs-per-node", "1"]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2 and "saved under deepspeed with 2 process(es)" in proc.stderr
        assert (out / "checkpoints/step-3/COMPLETE").is_file()


@pytest.mark.slow
def test_two_launchers_as_two_nodes_match_one_node(recipe_file, reference, tmp_path):
    """`vlmtune launch --nodes 2 --node-rank 0|1` on one machine behaves like one node with two processes."""
    config = cpu_config("ddp", tmp_path)
    out = tmp_path / "run"
    port = str(free_port())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "vlmtune.cli", "launch", str(recipe_file), f"train.output_dir={out}"]
    base += [f"launch.accelerate_config={config}", "--nodes", "2", "--procs-per-node", "1"]
    base += ["--main-ip", "127.0.0.1", "--main-port", port]
    nodes = [
        subprocess.Popen(
            [*base, "--node-rank", str(rank)], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
        )
        for rank in (0, 1)
    ]
    logs = [p.communicate(timeout=600)[1] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "ddp over 2 process(es)" in logs[0]
    assert losses(out) == pytest.approx(losses(reference), abs=1e-5)
    assert max_diff(adapter(out), adapter(reference)) < 2e-5


QLORA = "quant={bits: 4, compute_dtype: float32, storage_dtype: float32}"
QLORA_STEPS = ("train.max_steps=3", "checkpoint.every=0")


@pytest.fixture(scope="module")
def qlora_reference(recipe_file) -> Path:
    out = recipe_file.parent / "qlora-single"
    launch(recipe_file, f"train.output_dir={out}", "train.micro_batch_size=4", QLORA, *QLORA_STEPS, procs=1)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero3", "fsdp2"])
def test_qlora_with_sharded_weights_matches_one_process(name, recipe_file, qlora_reference, tmp_path):
    """4-bit weights stored in the model's float dtype can be sharded; the result equals unsharded QLoRA."""
    single, sharded = qlora_reference, tmp_path / "sharded"
    config = cpu_config(name, tmp_path)
    args = (f"train.output_dir={sharded}", f"launch.accelerate_config={config}", QLORA, *QLORA_STEPS)
    proc = launch(recipe_file, *args, procs=2)
    assert STRATEGIES[name] in proc.stderr
    assert losses(sharded) == pytest.approx(losses(single), abs=1e-5)
    assert max_diff(adapter(sharded), adapter(single)) < 2e-5


PLUS = ("lora.plus_lr_ratio=16", "train.max_steps=3", "checkpoint.every=0")


@pytest.fixture(scope="module")
def plus_reference(recipe_file) -> Path:
    out = recipe_file.parent / "plus-single"
    launch(recipe_file, f"train.output_dir={out}", "train.micro_batch_size=4", *PLUS, procs=1)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero2", "zero3", "fsdp2"])
def test_lora_plus_keeps_its_learning_rates_when_sharded(name, recipe_file, plus_reference, tmp_path):
    """DeepSpeed wraps the optimizer and FSDP2 swaps its parameters for shards: the B matrices' own group (and
    its learning rate) must survive both, so the run equals one process's LoRA+ run."""
    out = tmp_path / "run"
    config = cpu_config(name, tmp_path)
    proc = launch(
        recipe_file, f"train.output_dir={out}", f"launch.accelerate_config={config}", *PLUS, procs=2
    )
    assert STRATEGIES[name] in proc.stderr
    assert losses(out) == pytest.approx(losses(plus_reference), abs=1e-5)
    trained = adapter(out)
    # B starts at zero and Adam moves a weight at most about lr per step: past 3 × 1e-3 only at B's own rate.
    assert max(t.abs().max().item() for k, t in trained.items() if "lora_B" in k) > 1e-2
    assert max_diff(trained, adapter(plus_reference)) < 16 * 2e-5  # float noise, magnified 16× by B's lr


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "zero3", "fsdp2"])
def test_chunked_loss_on_two_processes_matches_the_standard_loss_on_one(
    name, recipe_file, reference, tmp_path
):
    """Under ZeRO-3 / FSDP2 the chunked loss gathers the frozen head once per micro-batch, so ranks with different
    trained-token counts (so different chunk counts) stay in step; they train like one process with the standard
    loss."""
    out = tmp_path / "run"
    args = (f"train.output_dir={out}", f"launch.accelerate_config={cpu_config(name, tmp_path)}")
    lean = ("train.loss=chunked", "train.loss_chunk_tokens=7", "train.gradient_checkpointing=true")
    proc = launch(recipe_file, *args, *lean, "checkpoint.every=0", procs=2)
    assert STRATEGIES[name] in proc.stderr
    assert losses(out) == pytest.approx(losses(reference), abs=1e-5)
    assert max_diff(adapter(out), adapter(reference)) < 2e-5


@pytest.mark.slow
def test_preempting_the_launcher_checkpoints_exits_75_and_resumes(recipe_file, tmp_path):
    """SIGUSR1 to `vlmtune launch` (what a scheduler sends): every rank stops at the same step with a checkpoint,
    the launcher exits 75 (not torchrun's 1), and the same command resumes to the uninterrupted result."""
    config = cpu_config("ddp", tmp_path)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    common = (f"launch.accelerate_config={config}", "train.max_steps=40", "checkpoint.every=0")
    launch(recipe_file, f"train.output_dir={whole}", *common, procs=2)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "vlmtune.cli",
        "launch",
        str(recipe_file),
        f"train.output_dir={cut}",
        *common,
    ]
    cmd += ["--procs-per-node", "2", "--main-port", str(free_port())]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    metrics = cut / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 75, err[-3000:]
    [ckpt] = (cut / "checkpoints").iterdir()
    assert 2 <= int(ckpt.name.split("-")[1]) < 40
    assert not (cut / "STOP").exists()

    proc = launch(recipe_file, f"train.output_dir={cut}", *common, procs=2)
    assert "resumed from" in proc.stderr
    assert losses(cut) == pytest.approx(losses(whole), abs=1e-6)
    assert max_diff(adapter(cut), adapter(whole)) < 1e-6


@pytest.mark.slow
def test_the_recipes_bf16_is_in_effect_under_deepspeed(recipe_file, reference, tmp_path):
    """The recipe's precision wins over the accelerate config's (DeepSpeed would otherwise take the file's)."""
    config = cpu_config("zero3", tmp_path)  # the file says mixed_precision: "no"
    out = tmp_path / "run"
    bf16 = ("train.mixed_precision=bf16", "model.dtype=bfloat16", "train.max_steps=3", "checkpoint.every=0")
    proc = launch(
        recipe_file, f"train.output_dir={out}", f"launch.accelerate_config={config}", *bf16, procs=2
    )
    assert "is not in effect" not in proc.stderr
    got, fp32 = losses(out), losses(reference)[:3]
    assert got != pytest.approx(fp32, abs=1e-6)  # really in bf16 ...
    assert got == pytest.approx(fp32, abs=5e-3)  # ... and still the same training
