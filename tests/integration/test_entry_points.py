"""The command lines as users type them: exit codes, messages, no tracebacks for user mistakes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_accelerate_launch_trains_and_resume_is_a_noop_when_done(tiny_recipe, tmp_path):
    recipe = _write_recipe(tmp_path / "r.yaml", tiny_recipe(train={"max_steps": 4}, checkpoint={"every": 2}))
    launch = [
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "accelerate_configs/cpu.yaml",
        "-m",
        "vlmtune.train",
    ]
    proc = _cli(*launch, str(recipe), "train.lr=5e-3", "lora.r=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "run"
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert (
        resolved["train"]["lr"] == 5e-3 and resolved["lora"]["r"] == 2
    )  # overrides land in the resolved recipe
    assert json.loads((out / "adapter/adapter_config.json").read_text())["r"] == 2
    assert "train: 100%" in proc.stderr  # the progress bar
    # Running the same recipe again resumes from the final checkpoint and has nothing left to do.
    again = _cli("-m", "vlmtune.train", str(recipe), "train.lr=5e-3", "lora.r=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "at step 4" in again.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4


def _bad(tmp_path: Path, base: dict, change) -> Path:
    recipe = json.loads(json.dumps(base))
    change(recipe)
    return _write_recipe(tmp_path / "bad.yaml", recipe)


CATALOGUE = {
    "unknown top-level key": (lambda r: r.update(trian={}), "trian: unknown key; did you mean `train`?"),
    "nested typo": (lambda r: r["train"].update(lrr=1), "train.lrr: unknown key; did you mean `lr`?"),
    "wrong type": (
        lambda r: r["train"].update(micro_batch_size="four"),
        "train.micro_batch_size: expected a positive integer or auto (got 'four')",
    ),
    "bad enum": (
        lambda r: r["train"].update(scheduler="cosin"),
        "train.scheduler: Input should be 'cosine', 'linear' or 'constant'",
    ),
    "negative lr": (lambda r: r["train"].update(lr=-1), "train.lr: Input should be greater than 0"),
    "zero max_length": (
        lambda r: r["data"].update(max_length=0),
        "data.max_length: Input should be greater than 0",
    ),
    "bad quant bits": (lambda r: r.update(quant={"bits": 3}), "quant.bits: Input should be 4 or 8"),
    "missing data file": (
        lambda r: r["data"]["train"][0].update(path="nope/train.jsonl"),
        "data.train.0.path: file not found: nope/train.jsonl",
    ),
    "missing accelerate config": (
        lambda r: r["launch"].update(accelerate_config="nope.yaml"),
        "launch.accelerate_config: file not found: nope.yaml",
    ),
    "missing model dir": (
        lambda r: r["model"].update(path="./no-such-model"),
        "model.path: ./no-such-model is not a model directory",
    ),
    "missing required key": (lambda r: r.pop("data"), "data: required key is missing"),
    "unwritable output_dir": (
        lambda r: r["train"].update(output_dir="/proc/vlmtune-run"),
        "train.output_dir: /proc/vlmtune-run is not writable",
    ),
    "incomplete resume checkpoint": (
        lambda r: r["checkpoint"].update(resume="/tmp"),
        "checkpoint.resume: /tmp is not a complete checkpoint",
    ),
    "fp16 with bf16 weights": (
        lambda r: (
            r.update(model={**r["model"], "dtype": "bfloat16"}) or r["train"].update(mixed_precision="fp16")
        ),
        "train.mixed_precision: fp16 with model.dtype bfloat16",
    ),
    "eval_every without eval data": (
        lambda r: r["train"].update(eval_every=5),
        "train.eval_every: evaluation is scheduled but data.eval lists no source",
    ),
    "8-bit under ZeRO-3": (
        lambda r: (
            r.update(quant={"bits": 8})
            or r["launch"].update(accelerate_config=str(REPO / "accelerate_configs/zero3.yaml"))
        ),
        "quant.bits: 8-bit weights cannot be sharded by ZeRO-3",
    ),
    "4-bit stored as uint8 under FSDP2": (
        lambda r: (
            r.update(quant={"bits": 4, "storage_dtype": "uint8"})
            or r["launch"].update(accelerate_config=str(REPO / "accelerate_configs/fsdp2.yaml"))
        ),
        "quant.storage_dtype: ZeRO-3 / FSDP shard 4-bit weights only when they are stored in the model's float "
        "dtype; set quant.storage_dtype: float32",
    ),
    "FSDP1 config": (
        lambda r: r["launch"].update(
            accelerate_config=_accel_file(r, {"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 1}})
        ),
        "fsdp_version 1: vlmtune supports FSDP2 only",
    ),
    "typo in fsdp_config": (
        lambda r: r["launch"].update(
            accelerate_config=_accel_file(
                r, {"distributed_type": "FSDP", "fsdp_config": {"fsdp_reshard_after_froward": True}}
            )
        ),
        "unknown fsdp_config key 'fsdp_reshard_after_froward'",
    ),
}


def _accel_file(recipe: dict, cfg: dict) -> str:
    path = Path(recipe["train"]["output_dir"]).parent / "accel.yaml"
    path.write_text(yaml.safe_dump({"num_processes": 2, **cfg}))
    return str(path)


@pytest.mark.parametrize("case", list(CATALOGUE), ids=list(CATALOGUE))
def test_bad_recipe_exits_2_with_a_clear_message(case, tiny_recipe, tmp_path):
    change, expected = CATALOGUE[case]
    path = _bad(tmp_path, tiny_recipe(), change)
    for cmd in (["-m", "vlmtune.train", str(path)], ["-m", "vlmtune.cli", "validate", str(path)]):
        proc = _cli(*cmd, timeout=120)
        assert proc.returncode == 2, (case, proc.stdout, proc.stderr[-2000:])
        assert expected in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was written for a rejected recipe


def test_bad_override_and_missing_recipe(tiny_recipe, tmp_path):
    path = _write_recipe(tmp_path / "r.yaml", tiny_recipe())
    proc = _cli("-m", "vlmtune.train", str(path), "lora.rank=8", "train.lr")
    assert proc.returncode == 2 and "lora.rank: unknown key; did you mean `r`?" in proc.stderr
    assert "override 'train.lr': expected KEY=VALUE" in proc.stderr
    proc = _cli("-m", "vlmtune.train", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "recipe file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_validate_accepts_a_good_recipe(tiny_recipe, tmp_path):
    proc = _cli("-m", "vlmtune.cli", "validate", str(_write_recipe(tmp_path / "r.yaml", tiny_recipe())))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok:") and "lora       r=4" in proc.stdout


def test_bad_data_row_names_file_and_row(tiny_recipe, tmp_path):
    data = tmp_path / "train.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    rows = [good] * 5 + [{"messages": [{"role": "user", "content": "only a question"}]}] + [good] * 3
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tiny_recipe(data={"train": [{"path": str(data)}]})
    path = _write_recipe(tmp_path / "r.yaml", recipe)
    proc = _cli("-m", "vlmtune.train", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{data} row 5 (line 6)" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run/adapter").exists()

    proc = _cli("-m", "vlmtune.train", str(path), "data.on_bad_row=skip", "train.max_steps=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "8 examples" in proc.stderr and "skipped" in proc.stderr


def test_sigterm_checkpoints_exits_75_and_the_rerun_resumes(tiny_recipe, tmp_path):
    import signal
    import time

    recipe = _write_recipe(
        tmp_path / "r.yaml", tiny_recipe(train={"max_steps": 400}, checkpoint={"every": 0})
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmtune.train", str(recipe)],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "run/metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-2000:]
    assert "preempted: stopped at step" in stderr and "Traceback" not in stderr
    (ckpt,) = (tmp_path / "run/checkpoints").iterdir()
    stopped_at = int(ckpt.name.removeprefix("step-"))
    assert 3 <= stopped_at < 400 and (ckpt / "COMPLETE").is_file()
    assert len(metrics.read_text().splitlines()) == stopped_at  # nothing logged past the checkpoint

    again = _cli("-m", "vlmtune.train", str(recipe))
    assert again.returncode == 0 and f"at step {stopped_at}" in again.stderr
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, 401))
