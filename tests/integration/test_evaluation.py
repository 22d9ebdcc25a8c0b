"""Evaluation users act on: its batch size and mode, early stopping with the best checkpoint, sample answers."""

import json
from pathlib import Path

import pytest
import torch

import vlmtune.engine.loop as loop
from vlmtune.train import run

EVAL = str(Path(__file__).parents[2] / "data/demo/eval.jsonl")  # 40 rows


def test_eval_runs_in_eval_mode_without_gradients_at_its_own_micro_batch(
    tiny_recipe, monkeypatch, one_thread
):
    calls, evaluations = [], []
    real_forward, real_evaluate = loop.forward, loop.Trainer.evaluate

    def forward(model, batch, *args, **kwargs):
        dropout = [m.training for n, m in model.named_modules() if n.endswith("lora_dropout.default")]
        calls.append(
            (bool(evaluations), model.training, set(dropout), torch.is_grad_enabled(), len(batch["labels"]))
        )
        return real_forward(model, batch, *args, **kwargs)

    def evaluate(self):
        evaluations.append(True)
        first, again = real_evaluate(self), real_evaluate(self)
        evaluations.clear()
        # No autograd graph was built, so no gradient is left on any parameter.
        assert all(p.grad is None for p in self.c.model.parameters())
        # Dropout (0.5 here) is off: two passes over the eval set give the same loss to the last bit.
        assert first == again
        return first

    monkeypatch.setattr(loop, "forward", forward)
    monkeypatch.setattr(loop.Trainer, "evaluate", evaluate)
    result = run(
        tiny_recipe(
            lora={"dropout": 0.5},
            data={"eval": [{"path": EVAL}]},
            train={"max_steps": 2, "eval_every": 1, "eval_micro_batch_size": 16},
        )
    )
    train_calls = [c for c in calls if not c[0]]
    eval_calls = [c for c in calls if c[0]]
    assert [c[1:] for c in train_calls] == [(True, {True}, True, 4)] * 2  # 2 steps, micro-batch 4, dropout on
    # 2 evaluations, each twice, of 40 rows in batches of 16: 16, 16, 8; dropout modules off, no autograd.
    assert [c[1:] for c in eval_calls] == [(False, {False}, False, n) for n in (16, 16, 8)] * 4
    assert [r["step"] for r in result.history if "eval_loss" in r] == [1, 2]


def test_early_stopping_keeps_and_exports_the_best_checkpoint_and_stays_stopped(
    tiny_recipe, tiny_model_dir, tmp_path, monkeypatch, one_thread
):
    """Eval losses scripted by step (the weights train for real): best at step 2, then 2 evals without a gain."""
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from vlmtune.train import main

    scripted = {1: 5.0, 2: 4.0, 3: 3.95, 4: 4.5}  # 3.95 is better, but not by more than min_delta 0.1
    monkeypatch.setattr(loop.Trainer, "evaluate", lambda self: {"eval_loss": scripted[self.state.step]})
    recipe = tiny_recipe(
        data={"eval": [{"path": EVAL}]},
        train={"max_steps": 10, "eval_every": 1, "early_stopping": {"patience": 2, "min_delta": 0.1}},
        checkpoint={"every": 1, "keep_last": 1, "keep_best": True, "export": "best"},
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main([str(path)]) == 0
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # stopped after 2 evals without a gain
    last = records[-1]
    assert (last["early_stopped"], last["best_step"], last["best_eval_loss"]) == (True, 2, 4.0)
    assert "for 2 evaluation(s)" in last["stop_reason"] and "4 at step 2" in last["stop_reason"]
    # keep_last 1 keeps the last checkpoint; keep_best keeps step 2 beside it.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    state = json.loads((out / "checkpoints/step-4/trainer_state.json").read_text())
    assert (state["best_step"], state["stopped_early"] != "") == (2, True)

    # adapter/ is the best checkpoint's adapter: plain peft gives that checkpoint's logits, not the last one's.
    x = torch.tensor([[1, 40, 41, 42, 43, 2]])

    def logits(adapter: Path) -> torch.Tensor:
        # A fresh base each time: PEFT adds its layers to the model it is given.
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        with torch.no_grad():
            return PeftModel.from_pretrained(base, adapter).eval()(x).logits

    exported = logits(out / "adapter")
    torch.testing.assert_close(exported, logits(out / "checkpoints/step-2/adapter"), rtol=0, atol=0)
    assert not torch.allclose(exported, logits(out / "checkpoints/step-4/adapter"), atol=1e-4)
    assert (out / "adapter/tokenizer_config.json").is_file()

    # Run again: the stopped run resumes at step 4 and stays stopped; the best checkpoint is still the export.
    (out / "adapter").rename(out / "first-adapter")
    assert main([str(path)]) == 0
    assert (out / "metrics.jsonl").read_text().count("\n") == len(records)
    torch.testing.assert_close(logits(out / "adapter"), exported, rtol=0, atol=0)


def _plain_peft_answer(model, tokenizer, messages: list[dict], max_new_tokens: int) -> str:
    """Greedy answer of a model loaded with plain transformers + PEFT, prompted through the chat template."""
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_sample_answers_are_the_models_greedy_answers_to_the_first_eval_prompts(
    tiny_recipe, tiny_model_dir, tmp_path, one_thread
):
    from peft import PeftModel
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train = {"max_steps": 4, "eval_every": 2, "eval_samples": 2, "eval_max_new_tokens": 6}
    result = run(tiny_recipe(data={"eval": [{"path": EVAL}]}, train={**train, "report_to": ["tensorboard"]}))
    out = result.output_dir
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 2, 4, 4]
    rows = [json.loads(line) for line in Path(EVAL).read_text().splitlines()[:2]]
    # The prompt is the conversation up to its last assistant turn (row 0 has two turns); the reference is that turn.
    assert [s["reference"].strip() for s in samples[2:]] == [r["messages"][-1]["content"] for r in rows]
    assert "What is the official animal" in samples[0]["prompt"] and samples[0]["prompt"].rstrip().endswith(
        "assistant"
    )
    assert "Which language is used in Talvessa?" in samples[0]["prompt"]
    assert samples[0]["completion"] != samples[2]["completion"]  # the model changed between steps 2 and 4

    # The last evaluation's answers are those of the final weights, as plain PEFT generates them.
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    for sample, row in zip(samples[2:], rows, strict=True):
        assert sample["completion"] == _plain_peft_answer(model, tokenizer, row["messages"][:-1], 6)

    events = EventAccumulator(str(next((out / "tensorboard").rglob("events.out.tfevents.*"))))
    events.Reload()
    texts = [t for t in events.Tags().get("tensors", []) if "eval_samples" in t]
    assert texts, events.Tags()


def test_a_real_eval_loss_that_stops_improving_stops_the_run_and_the_best_weights_are_exported(
    tiny_recipe, tiny_model_dir, one_thread
):
    """No script: a high constant lr makes the tiny model's eval loss bounce. The run stops at the first evaluation
    that is the `patience`-th without a new best, and adapter/ has the best eval loss, recomputed here."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vlmtune.config.schema import DataConfig, DataSource
    from vlmtune.data import Collator, build_dataset

    patience = 2
    result = run(
        tiny_recipe(
            data={"eval": [{"path": EVAL}]},
            train={
                "max_steps": 12,
                "lr": 0.1,
                "scheduler": "constant",
                "eval_every": 1,
                "eval_micro_batch_size": 40,
                "early_stopping": {"patience": patience},
            },
            checkpoint={"every": 0, "keep_last": 1, "keep_best": True, "export": "best"},
        )
    )
    evals = [r for r in result.history if "eval_loss" in r]
    losses = [r["eval_loss"] for r in evals]
    # The stop, recomputed from the losses the run measured: patience evaluations after the last new best.
    best, since, stop = 0, 0, None
    for i, loss in enumerate(losses):
        if i == 0 or loss < losses[best]:
            best, since = i, 0
        else:
            since += 1
        if since == patience:
            stop = i
            break
    assert stop is not None and stop < 11, losses  # it did stop early
    assert result.steps == len(losses) == stop + 1 and evals[-1]["early_stopped"] is True
    assert evals[-1]["best_step"] == best + 1 and evals[-1]["best_eval_loss"] == losses[best]

    tokenizer = AutoTokenizer.from_pretrained(result.adapter_dir)
    data = build_dataset(
        [DataSource(path=EVAL)], DataConfig(train=[DataSource(path=EVAL)], max_length=256), tokenizer, seed=0
    )
    batch = Collator(tokenizer.pad_token_id)([data[i] for i in range(len(data))])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    with torch.no_grad():
        loss = loop.token_loss_sum(loop.forward(model, batch), batch["labels"]) / loop.trained_tokens(
            batch["labels"]
        )
    assert loss.item() == pytest.approx(losses[best], rel=1e-5)
    assert all(abs(loss.item() - other) > 1e-4 for i, other in enumerate(losses) if i != best)
