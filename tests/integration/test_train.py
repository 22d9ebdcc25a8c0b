"""End to end on CPU: recipe → LoRA training → checkpoints → adapter, on a tiny random-init Llama."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.integration.helpers import crash_in_step
from vlmtune.engine.loop import Trainer
from vlmtune.train import run


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _assert_same_tensors(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0 if atol == 0 else 1e-4, msg=k)


def test_train_loss_falls_and_adapter_reloads_in_plain_peft(tiny_recipe, tiny_model_dir, tmp_path):
    recipe = tiny_recipe(
        train={"max_steps": 20, "eval_every": 10},
        data={"eval": [{"path": str(Path(__file__).parents[2] / "data/demo/eval.jsonl")}]},
        checkpoint={"every": 5, "keep_last": 2},
    )
    result = run(recipe)
    out = result.output_dir
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 21))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (18, 19, 20)) / 3
    assert last < first - 0.5, losses

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in (
        "step",
        "epoch",
        "loss",
        "lr",
        "grad_norm",
        "trained_tokens",
        "tokens_per_sec",
        "peak_mem_mb",
    ):
        assert key in records[-1]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [10, 20] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[1]["eval_ppl"] == pytest.approx(torch.tensor(evals[1]["eval_loss"]).exp().item(), rel=1e-6)

    # Output layout (public contract): resolved recipe, checkpoints (keep_last), final adapter with tokenizer.
    assert (out / "recipe.yaml").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-15", "step-20"]
    assert all((p / "COMPLETE").is_file() for p in (out / "checkpoints").iterdir())
    names = {p.name for p in (out / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"} <= names

    # Plain peft loads the adapter and reproduces the trained model's logits.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    x = torch.tensor([[1, 40, 41, 42, 43, 2]])
    with torch.no_grad():
        before = base(x).logits
        tuned = PeftModel.from_pretrained(base, out / "adapter").eval()
        after = tuned(x).logits
        merged = tuned.merge_and_unload()(x).logits
    assert not torch.allclose(before, after, atol=1e-4)  # the adapter changes the model
    torch.testing.assert_close(after, merged, atol=1e-5, rtol=1e-5)
    # The checkpoint's adapter at the last step is the final adapter.
    _assert_same_tensors(
        _adapter(out), load_file(str(out / "checkpoints/step-20/adapter/adapter_model.safetensors"))
    )


def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny_recipe, tmp_path, monkeypatch):
    sections = dict(lora={"dropout": 0.1}, train={"max_steps": 10}, checkpoint={"every": 4, "keep_last": 3})
    ref = run(
        tiny_recipe(**sections)
        | {"train": {**tiny_recipe(**sections)["train"], "output_dir": str(tmp_path / "ref")}}
    )

    crashing = tiny_recipe(**sections)
    crashing["train"]["output_dir"] = str(tmp_path / "crash")
    crash_in_step(monkeypatch, crashing, 7)
    assert max(_losses(tmp_path / "crash")) == 6  # steps 5 and 6 were logged after the last checkpoint (4)
    # a half-written checkpoint from a crash during a later save must be ignored
    (tmp_path / "crash/checkpoints/step-8.partial/adapter").mkdir(parents=True)

    resumed = run(crashing)
    assert resumed.steps == 10
    ref_losses, got = _losses(ref.output_dir), _losses(tmp_path / "crash")
    assert sorted(got) == list(range(1, 11))  # no step logged twice
    for step in ref_losses:
        assert got[step] == pytest.approx(ref_losses[step], abs=1e-6), step
    _assert_same_tensors(_adapter(ref.output_dir), _adapter(tmp_path / "crash"), atol=1e-6)
    assert not (tmp_path / "crash/checkpoints/step-8.partial").exists()


def test_micro_batch_times_accumulation_is_invariant(tiny_recipe, tmp_path):
    """micro_batch 1 × grad_accum 8 gives the same update as 8 × 1: the loss is normalised per window token."""
    outs = []
    for mb, ga in ((8, 1), (1, 8), (2, 4)):
        r = tiny_recipe(train={"micro_batch_size": mb, "grad_accum": ga, "max_steps": 3, "lr": 1e-3})
        r["train"]["output_dir"] = str(tmp_path / f"mb{mb}_ga{ga}")
        outs.append(run(r).output_dir)
    for other in outs[1:]:
        _assert_same_tensors(
            _adapter(outs[0]), _adapter(other), atol=1e-5
        )  # Adam amplifies fp noise on ~0 grads
        a, b = _losses(outs[0]), _losses(other)
        assert all(a[s] == pytest.approx(b[s], abs=1e-5) for s in a)


@pytest.mark.parametrize(
    "lora",
    [
        {"use_dora": True},
        {"use_rslora": True},
        {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]},
    ],
    ids=["dora", "rslora", "named-targets+modules_to_save"],
)
def test_lora_variants_train_and_reload(lora, tiny_recipe, tiny_model_dir):
    result = run(tiny_recipe(lora=lora, train={"max_steps": 3}))
    cfg = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    for key, value in lora.items():
        assert cfg[key] == value or set(cfg[key]) == set(value)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    x = torch.tensor([[1, 50, 60, 70, 2]])
    tuned = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    with torch.no_grad():
        merged = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), result.adapter_dir
        ).merge_and_unload()
        torch.testing.assert_close(tuned(x).logits, merged(x).logits, atol=1e-5, rtol=1e-5)
    if "modules_to_save" in lora:
        assert any("lm_head" in k for k in _adapter(result.output_dir))


def test_qlora_4bit_trains_on_cpu(tiny_recipe):
    pytest.importorskip("bitsandbytes")
    recipe = tiny_recipe(
        quant={
            "bits": 4,
            "type": "nf4",
            "double_quant": True,
            "compute_dtype": "float32",
            "storage_dtype": "uint8",
        },
        train={"max_steps": 12, "micro_batch_size": 8},
    )
    result = run(recipe)
    losses = _losses(result.output_dir)
    assert sum(losses[s] for s in (10, 11, 12)) < sum(losses[s] for s in (1, 2, 3)) - 0.3, losses
    assert any("lora_A" in k for k in _adapter(result.output_dir))


def test_gradient_checkpointing_gives_the_same_training(tiny_recipe, tmp_path):
    outs = []
    for gc in (False, True):
        r = tiny_recipe(train={"gradient_checkpointing": gc, "max_steps": 4}, lora={"dropout": 0.0})
        r["train"]["output_dir"] = str(tmp_path / f"gc{gc}")
        outs.append(run(r).output_dir)
    a, b = _losses(outs[0]), _losses(outs[1])
    assert all(a[s] == pytest.approx(b[s], abs=1e-5) for s in a)
    _assert_same_tensors(_adapter(outs[0]), _adapter(outs[1]), atol=1e-5)


def test_overflowed_fp16_steps_do_not_advance_the_schedule(tiny_recipe, monkeypatch):
    """The loss scaler's skipped steps are counted and leave the LR schedule where it was."""
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: True))
    result = run(tiny_recipe(train={"max_steps": 3, "warmup_ratio": 0.0, "lr": 1e-3}))
    records = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [1, 2, 3]
    assert all(r["lr"] == pytest.approx(1e-3) for r in records)  # cosine would have decayed it


def test_tensorboard_events_are_written(tiny_recipe):
    result = run(tiny_recipe(train={"max_steps": 2, "report_to": ["tensorboard"]}))
    assert list((result.output_dir / "tensorboard").rglob("events.out.tfevents.*"))


def test_8bit_weights_train_on_cpu(tiny_recipe):
    pytest.importorskip("bitsandbytes")
    result = run(tiny_recipe(quant={"bits": 8}, train={"max_steps": 3}))
    assert any("lora_B" in k for k in _adapter(result.output_dir))


def test_resuming_a_checkpoint_of_another_adapter_shape_is_a_clear_error(tiny_recipe):
    from vlmtune.errors import UserError

    run(tiny_recipe(train={"max_steps": 2}))
    with pytest.raises(UserError, match=r"does not fit this recipe's adapter.*checkpoint.resume=never"):
        run(tiny_recipe(train={"max_steps": 4}, lora={"r": 8}))


@pytest.mark.parametrize("how", ["SIGUSR1", "SIGTERM", "stop-file"])
def test_preemption_checkpoints_at_the_step_boundary_and_resumes_exactly(
    how, tiny_recipe, tmp_path, monkeypatch
):
    import os
    import signal

    from vlmtune.errors import Preempted

    sections = dict(train={"max_steps": 8}, checkpoint={"every": 0})
    ref = run(
        tiny_recipe(**sections)
        | {"train": {**tiny_recipe(**sections)["train"], "output_dir": str(tmp_path / "ref")}}
    )
    recipe = tiny_recipe(**sections)
    out = Path(recipe["train"]["output_dir"])
    original = Trainer.train_step

    def ask_to_stop_during_step_3(self, micro_batches):
        if self.state.step == 2:
            if how == "stop-file":
                (out / "STOP").touch()
            else:
                os.kill(os.getpid(), getattr(signal, how))
        return original(self, micro_batches)

    monkeypatch.setattr(Trainer, "train_step", ask_to_stop_during_step_3)
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="stopped at step 3"):
        run(recipe)
    assert signal.getsignal(signal.SIGTERM) is handler_before  # handlers are restored after the run
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-3"]
    assert (out / "checkpoints/step-3/COMPLETE").is_file() and not (out / "STOP").exists()

    monkeypatch.setattr(Trainer, "train_step", original)
    assert run(recipe).steps == 8
    assert _losses(out) == pytest.approx(_losses(ref.output_dir), abs=1e-6)
    _assert_same_tensors(_adapter(ref.output_dir), _adapter(out), atol=1e-6)


def _nan_from_call(monkeypatch, first: int, last: int) -> None:
    """Make the loss NaN on calls first..last of the loop's loss function (one call per step here)."""
    import vlmtune.engine.loop as loop

    calls = {"n": 0}
    original = loop.token_loss_sum

    def poisoned(logits, labels):
        calls["n"] += 1
        loss = original(logits, labels)
        return loss * float("nan") if first <= calls["n"] <= last else loss

    monkeypatch.setattr(loop, "token_loss_sum", poisoned)


def test_nonfinite_step_is_skipped_and_counted(tiny_recipe, monkeypatch):
    _nan_from_call(monkeypatch, 3, 3)
    result = run(tiny_recipe(train={"max_steps": 6, "nonfinite": "skip"}))
    records = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in records] == [0, 0, 1, 1, 1, 1]
    assert records[2]["lr"] == records[1]["lr"]  # the skipped step left the schedule where it was
    assert all(torch.isfinite(t).all() for t in _adapter(result.output_dir).values())


@pytest.mark.parametrize(("policy", "nan_calls", "stop_step"), [("abort", (2, 2), 2), ("skip", (2, 99), 5)])
def test_nonfinite_abort_and_too_many_in_a_row_stop_with_diagnostics(
    policy, nan_calls, stop_step, tiny_recipe, monkeypatch
):
    from vlmtune.errors import TrainingDiverged

    _nan_from_call(monkeypatch, *nan_calls)
    recipe = tiny_recipe(train={"max_steps": 8, "nonfinite": policy, "max_nonfinite_in_a_row": 3})
    with pytest.raises(TrainingDiverged, match=f"step {stop_step}"):
        run(recipe)
    diag = json.loads((Path(recipe["train"]["output_dir"]) / f"nonfinite-step-{stop_step}.json").read_text())
    assert diag["step"] == stop_step and diag["rank0_rows"]
