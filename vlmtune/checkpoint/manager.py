"""Crash-safe checkpoints: `<output_dir>/checkpoints/step-<N>/`, trusted only with their COMPLETE marker.

A checkpoint is written into `step-<N>.partial/` by every rank, then rank 0 writes `COMPLETE` (last, fsynced)
and renames the folder into place. A crash at any moment leaves either a complete checkpoint or a `.partial`
folder that resume ignores. Old checkpoints are removed only after the new one is complete.

Layout: `adapter/` (standard PEFT files, gathered from shards; what a user can take away), `trainer_state.json`,
`scheduler.pt`, `rng/rank-<i>.pt`, and the optimizer state in the form the sharding needs:
`optimizer.pt` (one process or DDP: replicated, written by rank 0), `deepspeed/` (ZeRO: DeepSpeed's own per-rank
partitions of the trainable weights and optimizer) or `sharded/` (FSDP2: a torch.distributed.checkpoint of the
trainable weights and optimizer, DTensor shards per rank).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from vlmtune.checkpoint.export import ADAPTER_WEIGHTS, replace_dir, save_adapter
from vlmtune.config.paths import resolve_path
from vlmtune.engine.distributed import strategy, trainable_state_dict
from vlmtune.engine.state import TrainState, rng_state, set_rng_state
from vlmtune.errors import UserError
from vlmtune.layout import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    MARKER,
    PARTIAL_SUFFIX,
    complete_checkpoints,
    is_complete,
    step_dir_name,
    step_of,
)
from vlmtune.logging import get_logger

log = get_logger(__name__)


class CheckpointManager:
    def __init__(
        self, output_dir: Path, accelerator, *, keep_last: int, method=None, keep_best: bool = False
    ) -> None:
        self.root = output_dir / CHECKPOINTS_DIR
        self.accelerator = accelerator
        self.keep_last = keep_last
        # checkpoint.keep_best: the checkpoint of the lowest eval loss (`TrainState.best_step`) outlives keep_last.
        self.keep_best = keep_best
        # The training method (`engine.method.Method`): its per-rank state (e.g. GRPO's rollouts not yet
        # trained on) is saved beside the RNGs, so a resumed run continues exactly.
        self.method = method

    # --- discovery -----------------------------------------------------------------------------------

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return complete_checkpoints(self.root)

    def latest(self) -> Path | None:
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def best(self, state: TrainState) -> Path | None:
        """The complete checkpoint of the lowest eval loss so far; None when there is none (no evaluation yet)."""
        path = self.root / step_dir_name(state.best_step)
        return path if state.best_step and is_complete(path) else None

    def resume_point(self, setting: str, base_dir: Path | None = None) -> Path | None:
        """Where `checkpoint.resume` says to start: the newest complete checkpoint, none, or a given path."""
        if setting == "auto":
            return self.latest()
        if setting == "never":
            return None
        return resolve_path(setting, base_dir)

    # --- save ----------------------------------------------------------------------------------------

    def save(self, step: int, model, optimizer, scheduler, state: TrainState) -> Path:
        """Write a complete checkpoint (a collective: every rank calls it).

        Raises:
            UserError: the disk is full or unwritable; the partial folder is removed and older checkpoints kept.
        """
        try:
            return self._save(step, model, optimizer, scheduler, state)
        except OSError as exc:
            partial = self.root / (step_dir_name(step) + PARTIAL_SUFFIX)
            if self.accelerator.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
            kept = self.latest()
            raise UserError(
                f"could not write checkpoint {step_dir_name(step)} in {self.root}: {exc.strerror or exc}. "
                + (f"The last complete checkpoint, {kept.name}, is intact: " if kept else "")
                + "free disk space (or lower checkpoint.keep_last) and run again to resume"
            ) from None

    def _save(self, step: int, model, optimizer, scheduler, state: TrainState) -> Path:
        acc = self.accelerator
        final = self.root / step_dir_name(step)
        partial = self.root / (step_dir_name(step) + PARTIAL_SUFFIX)
        if acc.is_main_process:
            if partial.exists():
                shutil.rmtree(partial)  # left by a crash: never trusted, never resumed from
            (partial / "rng").mkdir(parents=True)
        acc.wait_for_everyone()

        kind = strategy(acc)
        adapter = trainable_state_dict(acc, model)  # a collective under ZeRO-3 / FSDP2
        if acc.is_main_process:
            save_adapter(acc.unwrap_model(model), partial / ADAPTER_DIR, state_dict=adapter)
            _save_torch(scheduler.state_dict(), partial / "scheduler.pt")
            if acc.scaler is not None:
                _save_torch(acc.scaler.state_dict(), partial / "scaler.pt")
            _write_json(partial / "trainer_state.json", state.state_dict())
        _save_optimizer(kind, acc, model, optimizer, partial)
        _save_torch(rng_state(), partial / "rng" / f"rank-{acc.process_index}.pt")
        if self.method is not None and (extra := self.method.state_dict()):
            _save_torch(extra, partial / "rng" / f"method-rank-{acc.process_index}.pt")
        acc.wait_for_everyone()

        if acc.is_main_process:
            _fsync_tree(partial)
            _write_json(
                partial / MARKER,
                {"step": step, "time": time.time(), "world_size": acc.num_processes, "strategy": kind},
            )
            _fsync_dir(partial)
            replace_dir(partial, final)
            _fsync_dir(self.root)
            self._retain(state.best_step if self.keep_best else None)
        acc.wait_for_everyone()
        log.info("saved checkpoint %s", final)
        return final

    def _retain(self, best_step: int | None) -> None:
        done = self.complete_checkpoints()
        for old in done[: max(0, len(done) - self.keep_last)]:
            if best_step is None or step_of(old) != best_step:
                shutil.rmtree(old, ignore_errors=True)
        for p in self.root.iterdir():
            if p.name.endswith((PARTIAL_SUFFIX, ".old")) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    # --- load ----------------------------------------------------------------------------------------

    def load(self, path: Path, model, optimizer, scheduler, state: TrainState) -> None:
        """Restore everything `save` wrote. The model must already carry the same adapter layout."""
        if not is_complete(path):
            raise UserError(f"checkpoint.resume: {path} is not a complete checkpoint (no {MARKER} marker)")
        acc = self.accelerator
        kind = strategy(acc)
        saved = json.loads((path / MARKER).read_text())
        saved_kind, saved_world = saved.get("strategy", "none"), saved.get("world_size", 1)
        sharded = kind in ("deepspeed", "fsdp2")  # per-rank files: the same process count is needed
        if _family(saved_kind) != _family(kind) or (sharded and saved_world != acc.num_processes):
            raise UserError(
                f"checkpoint {path} was saved under {saved_kind} with {saved_world} process(es); this run uses "
                f"{kind} with {acc.num_processes}. Resume with the same accelerate config and process count, "
                "or start afresh with checkpoint.resume=never (the adapter in that checkpoint is standard PEFT)"
            )
        mismatch = "use checkpoint.resume=never, or another train.output_dir, to start afresh"
        try:
            if kind == "deepspeed":
                _load_deepspeed(model, path)
            elif kind == "fsdp2":
                _load_sharded(model, optimizer, path)
            else:
                self._load_adapter(model, path, mismatch)
                optimizer.load_state_dict(_load_torch(path / "optimizer.pt"))
        except RuntimeError as exc:  # shape mismatch: another LoRA rank or target set
            first = str(exc).strip().splitlines()[-1][:300]
            raise UserError(
                f"checkpoint {path} does not fit this recipe's adapter ({first}); {mismatch}"
            ) from None
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
        method_file = path / "rng" / f"method-rank-{acc.process_index}.pt"
        if self.method is not None and method_file.is_file():
            self.method.load_state_dict(_load_torch(method_file))

    def _load_adapter(self, model, path: Path, mismatch: str) -> None:
        weights = load_file(str(path / ADAPTER_DIR / ADAPTER_WEIGHTS))
        result = set_peft_model_state_dict(self.accelerator.unwrap_model(model), weights)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise UserError(
                f"checkpoint {path} does not fit this recipe's adapter (unexpected key {unexpected[0]}); {mismatch}"
            )


def check_free_space(output_dir: Path, model, keep_last: int) -> None:
    """Refuse to start when the checkpoints this run will keep cannot fit on the output disk.

    Per checkpoint: the trainable weights (fp32) and Adam's two moments, so 12 bytes per trainable parameter;
    `keep_last` of them plus the one being written, plus the final adapter. Frozen weights are never saved.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    need = 12 * trainable * (keep_last + 1) + 4 * trainable
    free = shutil.disk_usage(output_dir).free
    if free < need:
        raise UserError(
            f"train.output_dir: {output_dir} has {_size(free)} free, but this run's checkpoints need "
            f"about {_size(need)} ({keep_last} kept + 1 being written, {trainable:,} trainable "
            "parameters); free space, lower checkpoint.keep_last, or choose another output_dir"
        )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def _family(kind: str) -> str:
    """Checkpoints are interchangeable between one process and DDP (replicated state), not across shardings."""
    return "replicated" if kind in ("none", "ddp") else kind


def _save_optimizer(kind: str, acc, model, optimizer, partial: Path) -> None:
    if kind == "deepspeed":
        # Each rank writes its own partition; frozen base weights are left out (they come from the model files).
        model.save_checkpoint(
            str(partial / "deepspeed"), tag="state", exclude_frozen_parameters=True, save_latest=False
        )
    elif kind == "fsdp2":
        import torch.distributed.checkpoint as dcp

        dcp.save(_sharded_state(model, optimizer), checkpoint_id=str(partial / "sharded"))
    elif acc.is_main_process:
        _save_torch(optimizer.state_dict(), partial / "optimizer.pt")  # replicated on every rank


def _sharded_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(ignore_frozen_params=True)
    optim = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
    return {
        "model": get_model_state_dict(model, options=opts),
        "optimizer": get_optimizer_state_dict(model, optim, options=opts),
    }


def _load_sharded(model, optimizer, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = _sharded_state(model, optimizer)  # the shapes and shardings to read into
    dcp.load(state, checkpoint_id=str(path / "sharded"))
    opts = StateDictOptions(ignore_frozen_params=True, strict=False)
    set_model_state_dict(model, state["model"], options=opts)
    optim = getattr(optimizer, "optimizer", optimizer)
    set_optimizer_state_dict(model, optim, state["optimizer"], options=opts)


def _load_deepspeed(model, path: Path) -> None:
    loaded, _ = model.load_checkpoint(
        str(path / "deepspeed"), tag="state", load_module_strict=False, load_lr_scheduler_states=False
    )
    if loaded is None:
        raise UserError(f"checkpoint {path}: DeepSpeed found no state under {path / 'deepspeed'}")


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
