"""kill -9 at random moments, during checkpoint saves too, many times: every restart resumes from the newest
complete checkpoint, and the finished run equals an uninterrupted one (losses and adapter).

A driver process imports everything once, then forks one child per attempt (a fork costs milliseconds, an
interpreter start seconds); it runs no torch op itself, so each child starts its thread pools afresh.
"""

import json
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO

DRIVER = r"""
import json, os, random, signal, sys, time
from pathlib import Path
import vlmtune.train  # the heavy imports, once, before any fork

recipe, out, ref, kills, seed = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(seed)

def start(output_dir):
    pid = os.fork()
    if pid == 0:
        code = vlmtune.train.main([recipe, f"train.output_dir={output_dir}"])
        os._exit(code)
    return pid

def finish(pid):
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

t0 = time.monotonic()
assert finish(start(ref)) == 0
full = time.monotonic() - t0
during_save = killed = 0
while killed < kills:
    pid = start(out)
    if killed % 3 == 2:  # every third attempt: kill as soon as a checkpoint is being written
        deadline = time.monotonic() + full
        while time.monotonic() < deadline and not any((out / "checkpoints").glob("*.partial")):
            time.sleep(0.001)
    else:
        time.sleep(rng.uniform(0.0, full * 0.6))
    os.kill(pid, signal.SIGKILL)
    status = finish(pid)
    if status == 0:
        break  # it finished before the kill
    killed += 1
    during_save += any((out / "checkpoints").glob("*.partial")) if (out / "checkpoints").is_dir() else 0
code = finish(start(out))  # the last restart runs to the end
print(json.dumps({"killed": killed, "during_save": during_save, "final_code": code, "full_s": full}))
"""


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
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(path), str(out), str(ref), "20", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["final_code"] == 0, proc.stderr[-4000:]
    assert result["killed"] >= 20, result
    assert result["during_save"] >= 1, result  # some kills really hit a save in progress

    losses = [
        [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
        for d in (out, ref)
    ]
    assert len(losses[0]) == 40 and losses[0] == pytest.approx(losses[1], abs=1e-6)
    a, b = (load_file(str(d / "adapter/adapter_model.safetensors")) for d in (out, ref))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    # Nothing half-written is left behind once the run is complete.
    assert not list((out / "checkpoints").glob("*.partial")) and not list(out.glob("adapter.*"))
