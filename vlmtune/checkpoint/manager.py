"""Crash-safe checkpoints: `<output_dir>/checkpoints/step-<N>/`, trusted only with their COMPLETE marker.

A checkpoint is written into `step-<N>.partial/` by every rank, then rank 0 writes `COMPLETE` (last, fsynced)
and renames the folder into place. A crash at any moment leaves either a complete checkpoint or a `.partial`
folder that resume ignores. Old checkpoints are removed only after the new one is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from vlmtune.checkpoint.export import ADAPTER_WEIGHTS, replace_dir, save_adapter
from vlmtune.config.checks import resolve_path
from vlmtune.engine.state import TrainState, rng_state, set_rng_state
from vlmtune.errors import UserError
from vlmtune.logging import get_logger

log = get_logger(__name__)

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


class CheckpointManager:
    def __init__(self, output_dir: Path, accelerator, *, keep_last: int) -> None:
        self.root = output_dir / "checkpoints"
        self.accelerator = accelerator
        self.keep_last = keep_last

    # --- discovery -----------------------------------------------------------------------------------

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and is_complete(p):
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def resume_point(self, setting: str, base_dir: Path | None = None) -> Path | None:
        """Where `checkpoint.resume` says to start: the newest complete checkpoint, none, or a given path."""
        if setting == "auto":
            return self.latest()
        if setting == "never":
            return None
        return resolve_path(setting, base_dir)

    # --- save ----------------------------------------------------------------------------------------

    def save(self, step: int, model, optimizer, scheduler, state: TrainState) -> Path:
        acc = self.accelerator
        final = self.root / f"step-{step}"
        partial = self.root / f"step-{step}.partial"
        if acc.is_main_process:
            if partial.exists():
                shutil.rmtree(partial)  # left by a crash: never trusted, never resumed from
            (partial / "rng").mkdir(parents=True)
        acc.wait_for_everyone()

        unwrapped = acc.unwrap_model(model)
        if acc.is_main_process:
            save_adapter(unwrapped, partial / "adapter")
            _save_torch(optimizer.state_dict(), partial / "optimizer.pt")
            _save_torch(scheduler.state_dict(), partial / "scheduler.pt")
            if acc.scaler is not None:
                _save_torch(acc.scaler.state_dict(), partial / "scaler.pt")
            _write_json(partial / "trainer_state.json", state.state_dict())
        _save_torch(rng_state(), partial / "rng" / f"rank-{acc.process_index}.pt")
        acc.wait_for_everyone()

        if acc.is_main_process:
            _fsync_tree(partial)
            _write_json(
                partial / MARKER, {"step": step, "time": time.time(), "world_size": acc.num_processes}
            )
            _fsync_dir(partial)
            replace_dir(partial, final)
            _fsync_dir(self.root)
            self._retain()
        acc.wait_for_everyone()
        log.info("saved checkpoint %s", final)
        return final

    def _retain(self) -> None:
        done = self.complete_checkpoints()
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
        for p in self.root.iterdir():
            if p.name.endswith((".partial", ".old")) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    # --- load ----------------------------------------------------------------------------------------

    def load(self, path: Path, model, optimizer, scheduler, state: TrainState) -> None:
        """Restore everything `save` wrote. The model must already carry the same adapter layout."""
        if not is_complete(path):
            raise UserError(f"checkpoint.resume: {path} is not a complete checkpoint (no {MARKER} marker)")
        acc = self.accelerator
        weights = load_file(str(path / "adapter" / ADAPTER_WEIGHTS))
        mismatch = "use checkpoint.resume=never, or another train.output_dir, to start afresh"
        try:
            result = set_peft_model_state_dict(acc.unwrap_model(model), weights)
        except RuntimeError as exc:  # shape mismatch: another LoRA rank or target set
            first = str(exc).strip().splitlines()[-1]
            raise UserError(
                f"checkpoint {path} does not fit this recipe's adapter ({first}); {mismatch}"
            ) from None
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise UserError(
                f"checkpoint {path} does not fit this recipe's adapter (unexpected key {unexpected[0]}); {mismatch}"
            )
        optimizer.load_state_dict(_load_torch(path / "optimizer.pt"))
        scheduler.load_state_dict(_load_torch(path / "scheduler.pt"))
        if acc.scaler is not None and (path / "scaler.pt").is_file():
            acc.scaler.load_state_dict(_load_torch(path / "scaler.pt"))
        state.load_state_dict(json.loads((path / "trainer_state.json").read_text()))
        rng_file = path / "rng" / f"rank-{acc.process_index}.pt"
        if not rng_file.is_file():
            log.warning(
                "checkpoint %s has no RNG state for rank %d; dropout noise will differ",
                path,
                acc.process_index,
            )
            rng_file = path / "rng" / "rank-0.pt"
        set_rng_state(_load_torch(rng_file))


def _save_torch(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _load_torch(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` so the marker never lands before the data it vouches for."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
