"""The run folder's layout: the one place that spells its file and folder names.

`<output_dir>/recipe.yaml` (the resolved recipe), `metrics.jsonl`, `adapter/` (the final adapter) and
`checkpoints/step-<N>/` (each trusted only with its `COMPLETE` marker, written last). Writers
(`checkpoint.manager`, `train`) and readers (`checkpoint.source`, the recipe checks) import these names.
"""

from __future__ import annotations

import re
from pathlib import Path

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"  # train.eval_samples: {step, prompt, completion, reference} per line
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
# Written last (and fsynced) into a checkpoint folder: without it the folder is an interrupted save.
MARKER = "COMPLETE"
PARTIAL_SUFFIX = ".partial"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step}"


def step_of(path: Path) -> int | None:
    """The step of a `step-<N>` checkpoint folder; None for any other name (`step-3.partial` included)."""
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def is_complete(path: Path) -> bool:
    """A checkpoint folder whose save finished (its marker is there)."""
    return (path / MARKER).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete `step-<N>` folders under a `checkpoints/` folder, oldest first."""
    if not root.is_dir():
        return []
    found = [
        (step_of(p), p) for p in root.iterdir() if step_of(p) is not None and p.is_dir() and is_complete(p)
    ]
    return [p for _, p in sorted(found)]
