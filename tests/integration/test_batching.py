"""Batching modes end to end: padding-free trains like padded, packed runs resume exactly, refusals are clear."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.helpers import crash_in_step
from vlmtune.errors import RecipeError
from vlmtune.train import run

pytestmark = pytest.mark.usefixtures("one_thread")


def _records(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _run(tiny_recipe, tmp_path, name: str, data: dict, train: dict | None = None, **sections):
    recipe = tiny_recipe(data=data, train={"max_steps": 3, "lr": 1e-3, **(train or {})}, **sections)
    recipe["data"] = {**tiny_recipe()["data"], **data}
    recipe["train"]["output_dir"] = str(tmp_path / name)
    return recipe


def test_padding_free_trains_exactly_like_padded(tiny_recipe, tmp_path):
    padded = run(_run(tiny_recipe, tmp_path, "padded", {})).output_dir
    free = run(_run(tiny_recipe, tmp_path, "free", {"batching": "padding_free"})).output_dir
    a, b = _records(padded), _records(free)
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], abs=1e-5), step
        assert b[step]["trained_tokens"] == a[step]["trained_tokens"]
    for key, value in _adapter(padded).items():
        torch.testing.assert_close(_adapter(free)[key], value, atol=1e-5, rtol=1e-4, msg=key)


def test_packed_run_resumes_exactly_with_workers(tiny_recipe, tmp_path, monkeypatch):
    """A packed run crashed after its step-3 checkpoint and resumed (collating in a worker process) ends
    with the uninterrupted run's losses and adapter."""
    data = {"batching": "packed", "pack_length": 512}
    sections = {"train": {"max_steps": 6, "micro_batch_size": 2}, "checkpoint": {"every": 3, "keep_last": 2}}
    ref = run(_run(tiny_recipe, tmp_path, "ref", data, **sections)).output_dir
    ref_records = _records(ref)
    # 2 bins of 512 tokens per step: more rows per step than padded 2-row micro-batches.
    assert ref_records[1]["trained_tokens"] > 0 and all(r["loss"] > 0 for r in ref_records.values())

    crashing = _run(tiny_recipe, tmp_path, "crash", {**data, "num_workers": 1}, **sections)
    crash_in_step(monkeypatch, crashing, 5)
    assert run(crashing).steps == 6
    got = _records(tmp_path / "crash")
    assert sorted(got) == sorted(ref_records)
    for step, record in ref_records.items():
        assert got[step]["loss"] == pytest.approx(record["loss"], abs=1e-6), step
    for key, value in _adapter(ref).items():
        torch.testing.assert_close(_adapter(tmp_path / "crash")[key], value, atol=1e-6, rtol=0, msg=key)


def test_token_budget_micro_batches_train(tiny_recipe, tmp_path):
    """Padding-free micro-batches of ≤ N tokens are exactly packed bins of N, one per micro-batch."""
    budget = run(
        _run(tiny_recipe, tmp_path, "budget", {"batching": "padding_free"}, {"micro_batch_tokens": 384})
    ).output_dir
    packed = run(
        _run(
            tiny_recipe,
            tmp_path,
            "packed",
            {"batching": "packed", "pack_length": 384},
            {"micro_batch_size": 1},
        )
    ).output_dir
    a, b = _records(budget), _records(packed)
    assert [r["loss"] for r in a.values()] == pytest.approx([r["loss"] for r in b.values()], abs=1e-5)
    grouped = run(_run(tiny_recipe, tmp_path, "padded-budget", {}, {"micro_batch_tokens": 384})).output_dir
    assert len(_records(grouped)) == 3


def test_a_vision_language_model_that_cannot_keep_examples_apart_refuses_packing(tiny_recipe, tmp_path):
    """The family is detected from the checkpoint (no model.family): PaliGemma's prefix-LM mask spans the row."""
    from transformers import GemmaConfig, PaliGemmaConfig

    model = tmp_path / "paligemma"
    PaliGemmaConfig(text_config=GemmaConfig(hidden_size=64, num_hidden_layers=1)).save_pretrained(model)
    recipe = _run(tiny_recipe, tmp_path, "vlm", {"batching": "packed"})
    recipe["model"]["path"] = str(model)
    with pytest.raises(
        RecipeError, match=r"data\.batching: packed is not supported for paligemma models: its"
    ):
        run(recipe)
    assert not (tmp_path / "vlm").exists()


def test_resuming_with_another_batching_mode_warns(tiny_recipe, tmp_path, caplog):
    run(_run(tiny_recipe, tmp_path, "run", {"batching": "packed"}, {"max_steps": 1}))
    with caplog.at_level("WARNING"):
        assert run(_run(tiny_recipe, tmp_path, "run", {}, {"max_steps": 2})).steps == 2
    assert "resuming with batching=padded" in caplog.text and "checkpoint used batching=packed" in caplog.text
