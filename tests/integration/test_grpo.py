"""GRPO end to end by recipe: a tiny text model trains, logs rollouts and resumes exactly; a tiny Qwen2-VL trains
on the referring-box set under 2 processes (DDP, ZeRO-3, FSDP2) without hanging; sharded generation stays in step
when one rank finishes first."""

import json
from pathlib import Path

import pytest
import yaml

from tests.integration.helpers import count_4bit_forwards, cpu_config, crash_in_step, launch
from vlmtune.engine.loop import Trainer
from vlmtune.testing.rl_data import arithmetic_rows, write_box_set, write_jsonl
from vlmtune.testing.tiny_vlm import build_tiny_vlm
from vlmtune.train import run

# A random tiny model writes noise: a reward that varies with it (shorter is better) gives the groups a spread.
REWARDS_PY = """
def brevity(prompts, completions, **columns):
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # message prompts: messages
    return [1.0 / (1.0 + len(t)) for t in texts]
"""


def _records(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


@pytest.fixture
def grpo_recipe(tiny_recipe, tmp_path):
    write_jsonl(tmp_path / "prompts.jsonl", arithmetic_rows(16, seed=0))
    write_jsonl(tmp_path / "eval.jsonl", arithmetic_rows(3, seed=1))
    (tmp_path / "rewards.py").write_text(REWARDS_PY)

    def make(name: str, **grpo) -> dict:
        recipe = tiny_recipe(
            method="grpo",
            lora={"dropout": 0.1},
            data={
                "train": [{"path": str(tmp_path / "prompts.jsonl"), "format": "prompt"}],
                "eval": [{"path": str(tmp_path / "eval.jsonl"), "format": "prompt"}],
                "max_length": 128,
            },
            train={"micro_batch_size": 2, "max_steps": 5, "lr": 5e-3, "output_dir": str(tmp_path / name)},
            checkpoint={"every": 3, "keep_last": 2},
            grpo={
                "num_generations": 4, "max_completion_length": 8, "beta": 0.05, "loss": "dapo",
                "steps_per_generation": 2, "log_rollouts": 2,
                "rewards": [{"function": str(tmp_path / "rewards.py") + ":brevity"}, {"name": "accuracy"}],
                **grpo,
            },
        )  # fmt: skip
        return recipe

    return make


def test_grpo_trains_logs_rollouts_and_resumes_exactly(grpo_recipe, tmp_path, monkeypatch):
    ref = run(grpo_recipe("ref"))
    records = _records(ref.output_dir)
    assert sorted(records) == [1, 2, 3, 4, 5]
    keys = {"loss", "reward", "reward_std", "reward/brevity", "reward/accuracy", "kl", "completion_length",
            "clip_ratio", "tokens_per_sec"}  # fmt: skip
    assert keys <= set(records[1])
    # Generation happens on steps 1, 3 and 5 (each batch of rollouts is optimised for 2 steps).
    assert all("generation_tokens_per_sec" in records[s] for s in (1, 3, 5))
    assert "generation_tokens_per_sec" not in records[2]
    assert records[2]["reward"] == records[1]["reward"]  # the same rollouts, reused
    # 16 prompts, 2 per step, each pair of prompts optimised for 2 steps: 16 steps per epoch, none skipped.
    assert records[4]["epoch"] == 4 / 16
    assert all(0 < records[s]["completion_length"] <= 8 for s in records)
    # The held-out prompts are sampled and scored at the end (3 prompts: the second batch is one prompt).
    assert {"eval_loss", "eval_reward", "eval_reward/brevity", "eval_completion_length"} <= set(records[5])
    # Rollouts every 2 steps: step 2 (reused from step 1) and step 4, 2 prompts x 4 completions each.
    logged = sorted(p.name for p in (ref.output_dir / "rollouts").iterdir())
    assert logged == ["step-2.jsonl", "step-4.jsonl"]
    rows = [json.loads(x) for x in (ref.output_dir / "rollouts/step-4.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and set(rows[0]) >= {"prompt", "completion", "rewards", "reward", "advantage"}
    assert set(rows[0]["rewards"]) == {"brevity", "accuracy"}
    # Advantages are normalised per prompt: each group's sum is 0.
    for g in range(2):
        assert sum(r["advantage"] for r in rows[4 * g : 4 * g + 4]) == pytest.approx(0.0, abs=1e-4)

    # Crash in step 5 (after the checkpoint of step 3, whose rollouts step 4 reuses), then resume.
    crashing = grpo_recipe("crash")
    crash_in_step(monkeypatch, crashing, 5)
    resumed = run(crashing)
    assert resumed.steps == 5
    got = _records(tmp_path / "crash")
    for step in records:
        for key in {"loss", "reward", "reward/brevity", "kl", "completion_length", "eval_reward"} & set(
            records[step]
        ):
            assert got[step][key] == pytest.approx(records[step][key], abs=1e-6), (step, key)


@pytest.mark.parametrize("strategy", ["zero3", "zero2", "fsdp2", "ddp", "zero3-mixed", "fsdp2-mixed"])
def test_vision_language_grpo_under_two_processes_does_not_hang(strategy, tiny_vlm_root, tmp_path):
    model = build_tiny_vlm("qwen2_vl", tiny_vlm_root / "qwen2_vl")
    data = write_box_set(tmp_path / "boxes", n=8, seed=0)
    strategy, mixed = strategy.removesuffix("-mixed"), strategy.endswith("-mixed")
    if mixed:  # every other prompt has no image: a text-only rank must still run the vision tower in step
        rows = [json.loads(x) for x in data.read_text().splitlines()]
        for row in rows[::2]:
            del row["images"]
            row["prompt"] = [{"role": "user", "content": "Name a shape."}]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rewards.py").write_text(REWARDS_PY)
    recipe = {
        "model": {"path": str(model), "dtype": "float32"},
        "method": "grpo",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "vision": {"tower": "frozen"},
        "data": {"train": [{"path": str(data), "format": "prompt"}], "max_length": 512},
        "train": {
            "output_dir": str(tmp_path / "run"), "micro_batch_size": 1, "grad_accum": 1, "lr": 1.0e-3,
            "max_steps": 2, "warmup_ratio": 0.0, "mixed_precision": "no", "gradient_checkpointing": False,
            "log_every": 1, "report_to": [],
        },
        "checkpoint": {"every": 0, "keep_last": 1},
        # Every forward of generation is a collective under ZeRO-3 and FSDP2: the ranks must stay in step.
        "grpo": {
            "num_generations": 2, "max_completion_length": 6, "temperature": 1.0, "log_rollouts": 1,
            # iou and format stay 0 for a random model; brevity varies, so the update is not zero.
            "rewards": [
                {"name": "iou"}, {"name": "format", "weight": 0.5},
                {"function": str(tmp_path / "rewards.py") + ":brevity", "weight": 0.1},
            ],
        },
        "launch": {"accelerate_config": str(cpu_config(strategy, tmp_path))},
    }  # fmt: skip
    if mixed:  # layer by layer (ZeRO-3 would otherwise gather the whole model): the ranks must stay in step
        recipe["grpo"]["gather_for_generation"] = False
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    launch(path, procs=2)
    records = _records(tmp_path / "run")
    assert sorted(records) == [1, 2]
    assert {"reward", "reward/iou", "reward/format", "completion_length"} <= set(records[2])
    assert records[1]["grad_norm"] > 0  # the surrogate's gradient reached the sharded adapter
    rows = [json.loads(x) for x in (tmp_path / "run/rollouts/step-2.jsonl").read_text().splitlines()]
    assert len(rows) == 4  # 2 ranks x 1 prompt x 2 completions, gathered on rank 0
    assert all(isinstance(r["prompt"], list) and "iou" in r["rewards"] for r in rows)
    with_image = {isinstance(r["prompt"][0]["content"], list) for r in rows}
    assert with_image == (
        {True, False} if mixed else {True}
    )  # mixed: one rank's prompt had an image, one not
    assert (tmp_path / "run/adapter/adapter_model.safetensors").is_file()


def _synced_generation_worker(rank: int, model_dir: str, port: int, synced: bool, out: str) -> None:
    """One of 2 ranks of an FSDP2-sharded tiny model: rank 0's completions all end at their first token (every
    token is an end token there), rank 1's run to the length limit."""
    import os
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vlmtune.methods.rollout import HFGenerator

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=20))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    mesh = init_device_mesh("cpu", (2,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    tok = AutoTokenizer.from_pretrained(model_dir)
    eos = list(range(len(tok))) if rank == 0 else [tok.eos_token_id]
    gen = HFGenerator(model, tok, max_new_tokens=12, temperature=1.0, top_p=1.0, synced=synced, eos_ids=eos)
    ids = tok(["What is 1 + 2?"], return_tensors="pt")
    rollouts = gen(dict(ids), 2, torch.Generator().manual_seed(rank))
    Path(out, f"rank{rank}.json").write_text(json.dumps(rollouts.mask.sum(1).tolist()))
    dist.destroy_process_group()


def test_generation_under_fsdp2_does_not_hang_when_ranks_finish_apart(tiny_model_dir, tmp_path):
    """Every forward of a sharded model gathers parameters from all ranks: the rank that finishes first keeps
    stepping (synced_gpus) until the other is done, instead of leaving it waiting forever."""
    import torch.multiprocessing as mp

    from tests.integration.helpers import free_port

    mp.spawn(
        _synced_generation_worker,
        args=(str(tiny_model_dir), free_port(), True, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    lengths = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert lengths[0] == [1, 1]  # ended at once
    assert max(lengths[1]) > 1  # kept generating while rank 0 waited in step


def test_grpo_trains_with_qlora_bf16_and_gradient_checkpointing(grpo_recipe, monkeypatch):
    """Rollouts (KV cache, checkpointing off in eval mode), the reference and the loss on 4-bit weights in bf16."""
    recipe = grpo_recipe("qlora", steps_per_generation=1)
    recipe["quant"] = {"bits": 4, "compute_dtype": "bfloat16"}
    recipe["train"].update(mixed_precision="bf16", gradient_checkpointing=True, max_steps=3)
    recipe["checkpoint"]["every"] = 0
    calls = count_4bit_forwards(monkeypatch)
    result = run(recipe)
    assert calls[0] > 0  # really on 4-bit weights
    records = _records(result.output_dir)
    assert sorted(records) == [1, 2, 3]
    assert all(r["kl"] >= 0 and r["completion_length"] > 0 for r in records.values())
    assert records[3]["kl"] > 0  # the adapter moved the policy away from the 4-bit reference
    from safetensors.torch import load_file

    lora_b = [
        v
        for k, v in load_file(result.output_dir / "adapter/adapter_model.safetensors").items()
        if "lora_B" in k
    ]
    assert any(v.abs().max() > 0 for v in lora_b)


def test_grpo_stopped_by_a_stop_file_checkpoints_and_resumes_exactly(grpo_recipe, monkeypatch):
    """Preemption mid-reuse (after step 3; steps 3 and 4 share rollouts): the rerun optimises the same ones."""
    from vlmtune.errors import Preempted

    want = _records(run(grpo_recipe("ref")).output_dir)
    recipe = grpo_recipe("stopped")
    recipe["checkpoint"]["every"] = 0
    out = Path(recipe["train"]["output_dir"])
    original = Trainer.train_step

    def stop_during_step_3(self, micro_batches):
        if self.state.step == 2:
            (out / "STOP").touch()
        return original(self, micro_batches)

    monkeypatch.setattr(Trainer, "train_step", stop_during_step_3)
    with pytest.raises(Preempted, match="stopped at step 3"):
        run(recipe)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-3"]
    monkeypatch.setattr(Trainer, "train_step", original)
    assert run(recipe).steps == 5
    got = _records(out)
    for step in want:
        for key in ("loss", "reward", "kl", "completion_length"):
            assert got[step][key] == pytest.approx(want[step][key], abs=1e-6), (step, key)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_grpo_with_sharded_qlora_bf16_and_checkpointing_on_two_processes(strategy, grpo_recipe, tmp_path):
    """Rollouts with `synced_gpus`, the reference and the loss on 4-bit weights sharded by ZeRO-3 / FSDP2."""
    recipe = grpo_recipe("sharded", steps_per_generation=1)
    recipe["model"]["dtype"] = "bfloat16"
    recipe["quant"] = {"bits": 4, "compute_dtype": "bfloat16", "storage_dtype": "bfloat16"}
    recipe["train"].update(
        mixed_precision="bf16", gradient_checkpointing=True, max_steps=3, micro_batch_size=1
    )
    recipe["checkpoint"]["every"] = 0
    recipe["launch"]["accelerate_config"] = str(cpu_config(strategy, tmp_path))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    launch(path, procs=2)
    records = _records(tmp_path / "sharded")
    assert sorted(records) == [1, 2, 3]
    assert all(r["kl"] >= 0 and r["completion_length"] > 0 for r in records.values())
    assert records[1]["grad_norm"] > 0 and records[3]["kl"] > 0  # the adapter trained and moved the policy
    assert (tmp_path / "sharded/adapter/adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_zero3_rollouts_from_the_gathered_model_equal_layer_by_layer_ones(grpo_recipe, tmp_path):
    """`grpo.gather_for_generation` (ZeRO-3): the whole model gathered once per generation samples the same
    completions, rewards and losses as the layers gathered one by one at every token with ranks in step."""
    config = cpu_config("zero3", tmp_path)
    runs = {}
    for gather in (True, False):
        name = f"gather-{gather}"
        recipe = grpo_recipe(name, steps_per_generation=1, log_rollouts=1, gather_for_generation=gather)
        recipe["train"].update(max_steps=2, micro_batch_size=1)
        recipe["checkpoint"]["every"] = 0
        recipe["launch"]["accelerate_config"] = str(config)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        proc = launch(path, procs=2)
        assert ("whole model gathered" if gather else "layers gathered one by one") in proc.stderr
        runs[gather] = tmp_path / name
    got, want = _records(runs[True]), _records(runs[False])
    for step in (1, 2):
        for key in ("loss", "reward", "kl", "completion_length"):
            assert got[step][key] == pytest.approx(want[step][key], abs=1e-6), (step, key)
    rollouts = [(runs[g] / "rollouts/step-2.jsonl").read_text() for g in (True, False)]
    texts = [[json.loads(x)["completion"] for x in r.splitlines()] for r in rollouts]
    assert texts[0] == texts[1] and len(texts[0]) == 8  # 2 ranks × 1 prompt × 4 completions
