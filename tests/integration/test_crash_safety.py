"""kill -9 at random moments, during checkpoint saves too, many times: every restart resumes from the newest
complete checkpoint, and the finished run equals an uninterrupted one (losses and adapter).

Each attempt is a fresh process. So that the kills land in training and in saves rather than in the imports,
an attempt is killed a random moment after it makes progress (a new checkpoint appears), or, every third
attempt, as soon as a checkpoint folder is being written.
"""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO

KILLS = 20


def _checkpoints(out: Path) -> tuple[set[str], bool]:
    """Names of the complete checkpoints, and whether one is being written."""
    root = out / "checkpoints"
    if not root.is_dir():
        return set(), False
    names = {p.name for p in root.iterdir()}
    return {n for n in names if (root / n / "COMPLETE").is_file()}, any(n.endswith(".partial") for n in names)


@pytest.mark.slow
def test_kill_9_anywhere_never_breaks_resume(tiny_recipe, tmp_path):
    recipe = tiny_recipe(
        lora={"dropout": 0.0},
        train={"max_steps": 40, "lr": 1e-3, "log_every": 1},
        checkpoint={"every": 1, "keep_last": 2},
    )
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out, ref = tmp_path / "crashy", tmp_path / "reference"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def start(output_dir: Path) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "vlmtune.train", str(path), f"train.output_dir={output_dir}"]
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    assert start(ref).wait(timeout=300) == 0
    rng, killed, during_save = random.Random(0), 0, 0
    while killed < KILLS:
        seen, _ = _checkpoints(out)
        proc = start(out)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            done, saving = _checkpoints(out)
            if killed % 3 == 2 and saving:
                break  # mid-save
            if killed % 3 != 2 and done - seen:
                time.sleep(rng.uniform(0.0, 0.15))  # somewhere in the next step or its save
                break
            time.sleep(0.002)
        assert proc.poll() is None, (
            f"attempt {killed} ended by itself (code {proc.returncode}) before the kill"
        )
        proc.kill()
        proc.wait()
        killed += 1
        during_save += _checkpoints(out)[1]
    assert start(out).wait(timeout=300) == 0  # the last restart runs to the end
    assert during_save >= 1  # some kills really hit a save in progress

    losses = [
        [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
        for d in (out, ref)
    ]
    assert len(losses[0]) == 40 and losses[0] == pytest.approx(losses[1], abs=1e-6)
    a, b = (load_file(str(d / "adapter/adapter_model.safetensors")) for d in (out, ref))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    # Nothing half-written is left behind once the run is complete.
    assert not list((out / "checkpoints").glob("*.partial")) and not list(out.glob("adapter.*"))
