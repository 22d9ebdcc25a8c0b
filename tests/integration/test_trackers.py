"""Trackers (`train.report_to`) receive the same records as metrics.jsonl."""

import json
import struct
from pathlib import Path

import pytest

from vlmtune.engine.metrics import read_metrics
from vlmtune.train import run


def _wandb_records(path: Path):
    """The protobuf records of an offline wandb run file (a LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk = 7, 32768, b""  # after the file header: ":W&B", magic (2 bytes), version (1 byte)
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7]) if left >= 7 else (0, 0)
        if left < 7 or (length, kind) == (0, 0):  # block padding
            pos += left
            continue
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def test_wandb_offline_and_tensorboard_log_the_metrics(tiny_recipe, monkeypatch, one_thread):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = run(
        tiny_recipe(
            train={"max_steps": 3, "report_to": ["wandb", "tensorboard"], "tracker_project": "nb-test"}
        )
    )
    wandb.teardown()  # the wandb service writes the run file in the background; this flushes it (as exit does)
    out = result.output_dir
    losses = {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}
    assert sorted(losses) == [1, 2, 3]  # metrics.jsonl is still written

    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history, runs, config = {}, [], {}
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {
                item.key or ".".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            history[row["_step"]] = row
        elif kind == "run":
            runs.append((record.run.project, record.run.display_name))
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    assert runs[0] == ("nb-test", out.name)
    assert {step: row["loss"] for step, row in history.items()} == losses
    assert config["train.max_steps"] == 3 and config["lora.r"] == 4  # the recipe, flattened
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
