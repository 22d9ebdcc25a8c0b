"""Faults on one rank of two: a NaN loss is skipped (or aborts) on every rank alike; a dead rank stops the job
promptly with a message naming it, and the last complete checkpoint survives.

The faults are injected by a wrapper script that patches the loss function on rank 1 only, then runs the normal
entry point under the normal launcher.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.integration.helpers import REPO, adapter, cpu_config, free_port

WRAPPER = r"""
import os, signal, sys
import vlmtune.engine.loop as loop

real, calls = loop.token_loss_sum, [0]

def faulty(logits, labels):
    out = real(logits, labels)
    if os.environ.get("RANK") == "1":
        calls[0] += 1
        if calls[0] == int(os.environ.get("NAN_AT_CALL", 0)):
            out = out * float("nan")
        if calls[0] == int(os.environ.get("DIE_AT_CALL", 0)):
            os.kill(os.getpid(), signal.SIGKILL)
    return out

loop.token_loss_sum = faulty
from vlmtune.train import main
sys.exit(main(sys.argv[1:]))
"""


def _run(tmp_path, config_name: str, recipe, *overrides: str, fault: dict, timeout: int = 300):
    script = tmp_path / "faulty.py"
    script.write_text(WRAPPER)
    config = cpu_config(config_name, tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **fault}
    if config_name != "zero2":
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = [sys.executable, "-m", "vlmtune.launch", "--config_file", str(config), "--num_processes", "2"]
    cmd += ["--main_process_port", str(free_port()), "--mixed_precision", "no"]
    cmd += ["--multi_gpu"] if config_name == "ddp" else []
    cmd += [str(script), str(recipe), f"launch.accelerate_config={config}", *overrides]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_nan_on_one_rank_is_skipped_on_both_under_deepspeed(recipe_file, tmp_path):
    out = tmp_path / "run"
    # grad_accum 2: calls 5 and 6 of rank 1 are step 3's micro-batches.
    proc, _ = _run(tmp_path, "zero2", recipe_file, f"train.output_dir={out}", fault={"NAN_AT_CALL": "5"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "non-finite step 3" in proc.stderr
    records = _records(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["nonfinite_steps"] == 1 and records[-1]["skipped_steps"] == 1
    finite = [r["loss"] == r["loss"] for r in records]  # NaN != NaN
    assert finite == [True, True, False, True, True, True]
    weights = adapter(out)
    assert all(bool(t.isfinite().all()) for t in weights.values())  # the NaN never reached the weights


@pytest.mark.slow
def test_nonfinite_abort_stops_every_rank_with_exit_3_and_diagnostics(recipe_file, tmp_path):
    out = tmp_path / "run"
    proc, _ = _run(
        tmp_path,
        "ddp",
        recipe_file,
        f"train.output_dir={out}",
        "train.nonfinite=abort",
        fault={"NAN_AT_CALL": "5"},
    )
    assert proc.returncode == 3, proc.stderr[-4000:]
    assert "non-finite loss or gradient at step 3" in proc.stderr
    assert json.loads((out / "nonfinite-step-3.json").read_text())["step"] == 3
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_dead_rank_stops_the_job_promptly_and_names_it(recipe_file, tmp_path):
    out = tmp_path / "run"
    proc, took = _run(
        tmp_path, "ddp", recipe_file, f"train.output_dir={out}", "train.max_steps=50", "checkpoint.every=2",
        fault={"DIE_AT_CALL": "13", "VLMTUNE_TIMEOUT_MIN": "1"},
    )  # fmt: skip
    assert proc.returncode != 0
    assert "rank 1: exit -9" in proc.stderr, proc.stderr[-4000:]
    assert took < 120  # not a hang until a collective timeout of many minutes
    # Rank 1 died in step 7: the step-6 checkpoint, written before, is complete and is what a rerun resumes.
    assert (out / "checkpoints/step-6/COMPLETE").is_file()
