"""Loop counters and random-number-generator state: everything besides weights that exact resume needs."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done; the data position is derived from it (see data/sampler.py)
    trained_tokens: int = 0
    skipped_steps: int = 0  # steps without an update: fp16 overflow, or non-finite loss / gradients
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0
    bad_rows: int = 0  # rows left out of their micro-batch: an image failed to decode (data.on_bad_row: skip)
    global_batch: int = 0  # recorded so a resume with a different batch layout is noticed
    data_layout: str = (
        ""  # likewise for the batching mode (data/batching.py `layout`); "" in older checkpoints
    )
    total_steps: int = 0
    # The lowest eval loss so far and its step (the checkpoint checkpoint.keep_best keeps), evaluations since it,
    # and why train.early_stopping ended the run ("" while it goes on): see engine/early_stop.py.
    best_eval_loss: float | None = None
    best_step: int = 0
    evals_since_best: int = 0
    stopped_early: str = ""

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if hasattr(self, key):
                setattr(self, key, value)


def rng_state() -> dict:
    """RNG states as tensors and plain values, so they load with `torch.load(weights_only=True)`."""
    np_state = np.random.get_state()
    state = {
        "python": _to_plain(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_py, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py(value):
    return value.item() if hasattr(value, "item") else value


def _to_plain(value):
    return [_to_plain(v) for v in value] if isinstance(value, tuple) else value


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list) else value
