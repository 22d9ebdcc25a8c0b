"""Metrics: one JSON line per log step in `<output_dir>/metrics.jsonl`, and the accelerate trackers."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated by torch, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file, oldest first; a line cut short by a crash is left out."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsWriter:
    """Appends metric records on the main process; `rewind` drops records past a resumed step."""

    def __init__(self, path: Path, accelerator) -> None:
        self.path = path
        self.accelerator = accelerator

    def rewind(self, step: int) -> None:
        """Forget records after `step`: a resumed run logs them again, and the file must not hold them twice."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
            if record.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        tmp.replace(self.path)

    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"}
        self.accelerator.log(scalars, step=record["step"])
