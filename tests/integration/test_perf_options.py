"""The memory and speed options end to end: same losses as the standard run, and the throughput metrics."""

import json
from pathlib import Path

import pytest

from vlmtune.engine.flops import PEAK_ENV
from vlmtune.train import run

pytestmark = pytest.mark.usefixtures("one_thread")

EVAL = str(Path(__file__).parents[2] / "data/demo/eval.jsonl")


def _records(result) -> list[dict]:
    return [json.loads(line) for line in result.metrics_file.read_text().splitlines()]


def test_chunked_loss_with_offloading_trains_like_the_standard_loss(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv(PEAK_ENV, "0.001")  # a pretend peak, so the CPU run reports MFU too
    common = {"max_steps": 4, "gradient_checkpointing": True}
    data = {"eval": [{"path": EVAL}]}
    standard = _records(run(tiny_recipe(train=common, data=data)))
    lean_recipe = tiny_recipe(
        train={
            **common,
            "output_dir": str(tmp_path / "lean"),
            "loss": "chunked",
            "loss_chunk_tokens": 16,
            "activation_offloading": True,  # no effect on the CPU, and says so
        },
        data=data,
    )
    lean = _records(run(lean_recipe))
    assert [r["loss"] for r in lean] == pytest.approx([r["loss"] for r in standard], rel=1e-5)
    assert lean[-1]["eval_loss"] == pytest.approx(standard[-1]["eval_loss"], rel=1e-5)
    for r in lean:
        assert 0 < r["trained_tokens_per_sec"] < r["tokens_per_sec"]  # the demo data trains answers only
        assert 0 <= r["data_wait_frac"] < 0.5  # collating a tiny batch is quick next to a step
        assert r["mfu"] > 0


def test_no_mfu_without_a_known_peak(tiny_recipe, monkeypatch):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    records = _records(run(tiny_recipe(train={"max_steps": 1})))
    assert "mfu" not in records[-1] and records[-1]["trained_tokens_per_sec"] > 0
