"""scripts/slurm/multinode.sbatch on a real two-node Slurm cluster (the local one of scripts/slurm/local_cluster.sh,
which CI starts): two nodes train exactly like one process with the same global batch, and a job signalled for
preemption checkpoints, exits 75, requeues itself, resumes and ends with the uninterrupted run's adapter.
Skipped, with the reason, when the cluster is not up; the test never installs or starts anything itself.
"""

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "scripts/slurm/multinode.sbatch"
NODES = ("node1", "node2")
START_CLUSTER = "start it with `sudo bash scripts/slurm/local_cluster.sh`"
JOB_TIMEOUT_S = 300


def _cluster_problem() -> str | None:
    """Why the local two-node cluster cannot run a job now, or None when it can."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return f"no Slurm client (sinfo, sbatch) on PATH; {START_CLUSTER}"
    # `scontrol ping` answers at once; sinfo retries an absent controller for ~10 s.
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if ping.returncode != 0:
        said = (ping.stdout + ping.stderr).strip().splitlines() or ["`scontrol ping` failed"]
        return f"{said[0]}; {START_CLUSTER}"
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return f"sinfo failed ({proc.stderr.strip() or proc.returncode}); {START_CLUSTER}"
    states = dict(line.split()[:2] for line in proc.stdout.splitlines() if line.strip())
    usable = {"idle", "mix", "alloc", "comp"}  # a busy node only makes the job wait
    bad = [f"{n}: {states.get(n, 'missing')}" for n in NODES if states.get(n) not in usable]
    return f"local Slurm cluster not ready ({', '.join(bad)}); {START_CLUSTER}" if bad else None


@pytest.fixture(scope="module")
def slurm() -> None:
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)


def _job_env() -> dict[str, str]:
    # sbatch hands this environment to the job; the job activates the venv running these tests.
    return {
        **os.environ,
        "VLMTUNE_VENV": str(Path(sys.executable).parent.parent),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # two "nodes" share this machine's cores
    }


def _sbatch(log_dir: Path, name: str, recipe: Path, *overrides: str) -> list[str]:
    return [
        "sbatch", "--wait", "--nodes", "2", "--time", "10", "--job-name", name,
        "--output", str(log_dir / "slurm-%j.out"), "--chdir", str(REPO),
        str(SBATCH), str(recipe), *overrides,
    ]  # fmt: skip


def _job_log(log_dir: Path) -> str:
    logs = sorted(log_dir.glob("slurm-*.out"))
    assert len(logs) == 1, logs  # a requeued job keeps its id, so its log goes on in the same file
    return logs[0].read_text()


def _finish(proc: subprocess.Popen, name: str, log_dir: Path) -> tuple[int, str]:
    """Wait for `sbatch --wait`: the job's exit code and log. Cancels the job if it runs too long."""
    try:
        proc.wait(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--name", name], check=False)
        proc.kill()
        pytest.fail(f"job {name} still running after {JOB_TIMEOUT_S} s:\n{_job_log(log_dir)[-4000:]}")
    return proc.returncode, _job_log(log_dir)


def _train_one_process(recipe: Path, *overrides: str) -> subprocess.Popen:
    """The reference: one process on this machine, no Slurm, no launcher."""
    cmd = [sys.executable, "-m", "vlmtune.train", str(recipe), *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=_job_env(), stderr=subprocess.PIPE, text=True)


def _wait_ok(proc: subprocess.Popen) -> None:
    _, stderr = proc.communicate(timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 0, stderr[-4000:]


def _max_diff(a: Path, b: Path) -> float:
    x, y = (load_file(str(p / "adapter/adapter_model.safetensors")) for p in (a, b))
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def _write_recipe(tiny_recipe, path: Path, **train) -> Path:
    # Small lr, no dropout: as in test_ddp.py, so 2 processes and 1 agree to float noise.
    r = tiny_recipe(
        lora={"dropout": 0.0}, train={"lr": 1e-3, **train}, checkpoint={"every": 2, "keep_last": 3}
    )
    path.write_text(yaml.safe_dump(r))
    return path


@pytest.mark.slow
def test_two_nodes_train_like_one_process(slurm, tiny_recipe, tiny_model_dir, tmp_path):
    recipe = _write_recipe(tiny_recipe, tmp_path / "recipe.yaml", max_steps=6)
    slurm_run, single = tmp_path / "slurm", tmp_path / "single"
    name = f"vlmtune-test-{uuid.uuid4().hex[:8]}"
    # Global batch 8 both ways: 2 micro × 2 accum × 2 nodes, and 4 micro × 2 accum × 1 process.
    reference = _train_one_process(
        recipe, f"train.output_dir={single}", "train.micro_batch_size=4", "train.grad_accum=2"
    )
    job = subprocess.Popen(
        _sbatch(tmp_path, name, recipe, f"train.output_dir={slurm_run}", "train.micro_batch_size=2",
                "train.grad_accum=2"),
        cwd=REPO, env=_job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    code, log = _finish(job, name, tmp_path)
    _wait_ok(reference)

    assert code == 0, log[-4000:]
    assert "on 2 node(s) node[1-2]" in log
    assert "global batch 8 = 2 micro × 2 accum × 2 processes" in log
    rng_files = sorted(p.name for p in (slurm_run / "checkpoints/step-6/rng").iterdir())
    assert rng_files == ["rank-0.pt", "rank-1.pt"]
    assert _max_diff(single, slurm_run) < 2e-5

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), slurm_run / "adapter"
    )
    assert any("lora_A" in n for n, _ in model.named_parameters())


@pytest.mark.slow
def test_preempted_job_requeues_and_resumes(slurm, tiny_recipe, tmp_path):
    # Global batch 64 (8 micro × 4 accum × 2 nodes): steps slow enough to signal the job while it trains.
    recipe = _write_recipe(tiny_recipe, tmp_path / "recipe.yaml", max_steps=12)
    slurm_run, single = tmp_path / "slurm", tmp_path / "single"
    name = f"vlmtune-test-{uuid.uuid4().hex[:8]}"
    job = subprocess.Popen(
        _sbatch(tmp_path, name, recipe, f"train.output_dir={slurm_run}", "train.micro_batch_size=8",
                "train.grad_accum=4"),
        cwd=REPO, env=_job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    first_checkpoint = slurm_run / "checkpoints/step-2/COMPLETE"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not first_checkpoint.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first_checkpoint.exists(), f"no checkpoint at step 2:\n{_job_log(tmp_path)[-4000:]}"
    # What Slurm does before the time limit with --signal=B:USR1@...: signal the batch shell only.
    subprocess.run(["scancel", "--signal=USR1", "--batch", "--name", name], check=True)
    reference = _train_one_process(
        recipe, f"train.output_dir={single}", "train.micro_batch_size=16", "train.grad_accum=4"
    )
    code, log = _finish(job, name, tmp_path)
    _wait_ok(reference)

    assert code == 0, log[-4000:]
    assert "stopped after a checkpoint (exit 75); requeueing job" in log, log[-4000:]
    assert "(restart 1)" in log and "resumed from" in log, log[-4000:]
    assert (slurm_run / "adapter/adapter_model.safetensors").is_file()
    assert _max_diff(single, slurm_run) < 2e-5
