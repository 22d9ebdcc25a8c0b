"""Batch sizes that find themselves: `train.micro_batch_size: auto` and `train.global_batch_size`.

At start-up `resolve_batch` turns the recipe's batch keys into the two numbers training uses, micro-batch and
accumulation steps. With `auto` the memory planner (`plan_recipe`, on this device's memory) gives the largest
micro-batch that fits; on a GPU a probe then confirms it with real forward/backward passes at the data's longest
rows, stepping down on out-of-memory. With `global_batch_size`, accumulation is derived so that
micro × accumulation × processes is exactly the global batch. A resumed run keeps the values its run folder's
recipe.yaml recorded, so it never re-sizes itself to a different data order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from vlmtune.config.paths import resolve_path
from vlmtune.config.schema import Recipe
from vlmtune.errors import RecipeError
from vlmtune.layout import CHECKPOINTS_DIR, RECIPE_FILE, complete_checkpoints
from vlmtune.logging import get_logger
from vlmtune.plan.memory import GIB

log = get_logger(__name__)

# probe(n) → True when a micro-batch of n rows trains without running out of memory.
Probe = Callable[[int], bool]


@dataclass(frozen=True)
class BatchChoice:
    """The batch sizes a run trains with, and how they were chosen (for the log)."""

    micro_batch_size: int
    grad_accum: int
    how: str


def grad_accum_for(recipe: Recipe, micro: int, world: int) -> int:
    """Accumulation steps for `micro` rows per process: derived from `train.global_batch_size` when set.

    Raises:
        RecipeError: the global batch is not a multiple of micro × processes.
    """
    t = recipe.train
    if t.global_batch_size is None:
        return t.grad_accum
    per_step = micro * world
    if t.global_batch_size % per_step:
        fits = [
            m for m in range(1, t.global_batch_size // world + 1) if t.global_batch_size % (m * world) == 0
        ]
        hint = (
            f"micro_batch_size values that divide it over {world} process(es): {fits}"
            if fits
            else f"make it a multiple of the {world} processes"
        )
        raise RecipeError(
            [
                f"train.global_batch_size: {t.global_batch_size} is not a multiple of micro_batch_size {micro} × "
                f"{world} process(es) = {per_step}, so no whole number of accumulation steps gives it; {hint}"
            ]
        )
    return t.global_batch_size // per_step


def candidates(upper: int, world: int, global_batch: int | None) -> list[int]:
    """Micro-batch sizes 1..upper (ascending) that the global batch allows (all of them without one)."""
    if global_batch is None:
        return list(range(1, upper + 1))
    return [m for m in range(1, upper + 1) if global_batch % (m * world) == 0]


def largest_fitting(sizes: list[int], probe: Probe) -> tuple[int | None, list[tuple[int, bool]]]:
    """The largest of `sizes` (ascending) that `probe` accepts, assuming memory grows with the size; and the
    tries in order. The largest is tried first (the planner expects it to fit); after an out-of-memory the
    next try halves the size, then bisects between the last size that fitted and the first that did not."""
    tries: list[tuple[int, bool]] = []
    good, bad = -1, len(sizes)  # indices: sizes[good] fits, sizes[bad] does not
    i = len(sizes) - 1
    while i > good:
        ok = probe(sizes[i])
        tries.append((sizes[i], ok))
        if ok:
            good = i
        else:
            bad = i
        if good == -1:  # nothing fitted yet: step down to half the size that failed
            half = sizes[bad] // 2
            i = max((j for j in range(bad) if sizes[j] <= half), default=0 if bad > 0 else -1)
        else:
            i = (good + bad) // 2
    return (sizes[good] if good >= 0 else None), tries


def device_memory(device) -> int:
    """Bytes the planner may fill on `device`: a GPU's total memory; on the CPU, the RAM available now, shared
    by the processes of this machine."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return available // max(local, 1)


def kept_choice(recipe: Recipe) -> tuple[int, int, Path] | None:
    """(micro, accumulation, recipe file) recorded by the run this one resumes; None when it starts afresh."""
    setting = recipe.checkpoint.resume
    if setting == "never":
        return None
    out = Path(recipe.train.output_dir).expanduser().resolve()
    if setting == "auto":
        if not complete_checkpoints(out / CHECKPOINTS_DIR):
            return None
        run_dir = out
    else:
        run_dir = resolve_path(setting, recipe._base_dir).parent.parent  # <run>/checkpoints/step-N
    path = run_dir / RECIPE_FILE
    try:
        train = (yaml.safe_load(path.read_text()) or {}).get("train") or {}
    except (OSError, yaml.YAMLError):
        return None
    micro, accum = train.get("micro_batch_size"), train.get("grad_accum")
    if isinstance(micro, int) and isinstance(accum, int):
        return micro, accum, path
    return None


def planner_largest(recipe: Recipe, world: int, memory: int) -> int:
    """The largest micro-batch the memory planner fits in `memory` bytes per process (0: not even one row)."""
    from vlmtune.plan.fit import plan_recipe

    trial = with_batch(recipe, 1, recipe.train.grad_accum)
    return plan_recipe(trial, gpus=world, gpu_mem_gib=memory / GIB).largest_micro_batch


def with_batch(recipe: Recipe, micro: int, accum: int) -> Recipe:
    """`recipe` training with `micro` rows per micro-batch and `accum` accumulation steps."""
    train = recipe.train.model_copy(update={"micro_batch_size": micro, "grad_accum": accum})
    out = recipe.model_copy(update={"train": train})
    out._base_dir = recipe._base_dir
    return out


def resolve_batch(
    recipe: Recipe,
    *,
    world: int,
    rows: int,
    memory: int,
    probe: Probe | None = None,
    agree: Callable[[int], int] = lambda n: n,
    planner: Callable[[Recipe, int, int], int] | None = None,
) -> tuple[Recipe, BatchChoice]:
    """The recipe with integer batch sizes, and how they were chosen.

    Args:
        world: training processes.
        rows: training items (rows; bins when packed) in the data: one step never takes more.
        memory: bytes per process the planner may fill (`device_memory`).
        probe: confirms a micro-batch size on the device (None: the planner alone decides, as on the CPU).
        agree: makes the processes agree on the size (the smallest any process found); identity for one.
        planner: (recipe, world, memory) → largest micro-batch that fits (default `planner_largest`).

    Raises:
        RecipeError: the global batch cannot be met exactly, or not even one row fits.
    """
    t = recipe.train
    if t.micro_batch_size != "auto":
        accum = grad_accum_for(recipe, t.micro_batch_size, world)
        how = (
            "recipe"
            if t.global_batch_size is None
            else f"grad_accum from global_batch_size {t.global_batch_size}"
        )
        return with_batch(recipe, t.micro_batch_size, accum), BatchChoice(t.micro_batch_size, accum, how)
    kept = kept_choice(recipe)
    if kept is not None:
        micro, accum, path = kept
        choice = BatchChoice(micro, accum, f"kept from {path} (resumed run)")
        return with_batch(recipe, micro, accum), choice
    fitted = (planner or planner_largest)(recipe, world, memory)
    # One step never needs more rows than the global batch (or, without one, than the data) holds.
    cap = t.global_batch_size // world if t.global_batch_size else math.ceil(rows / (world * t.grad_accum))
    upper = min(fitted, max(cap, 1))
    where = f"{memory / GIB:.1f} GiB per process"
    if fitted == 0 and probe is None:
        raise RecipeError(
            [
                f"train.micro_batch_size: auto: the planner fits not even one row in {where}; see `vlmtune plan` "
                "for what to change (gradient checkpointing, QLoRA, a shorter data.max_length)"
            ]
        )
    sizes = candidates(max(upper, 1), world, t.global_batch_size)
    if not sizes:
        raise RecipeError(
            [
                f"train.global_batch_size: {t.global_batch_size} is not a multiple of the {world} processes, so no "
                "micro-batch size gives it exactly; make it a multiple of the process count"
            ]
        )
    if probe is None:
        # Processes may see different free memory (CPU RAM read at different moments): all take the smallest.
        micro, how = agree(sizes[-1]), f"planner: largest that fits {where} is {fitted}"
    else:
        found, tries = largest_fitting(sizes, probe)
        micro = agree(found or 0)
        tried = ", ".join(f"{n} {'ok' if ok else 'out of memory'}" for n, ok in tries)
        how = f"planner: {fitted} fit {where}; probe: {tried}"
        if micro == 0:
            raise RecipeError(
                [
                    f"train.micro_batch_size: auto: not even one row trains on this device ({how}); enable "
                    "train.gradient_checkpointing, QLoRA (quant.bits: 4) or lower data.max_length"
                ]
            )
    if upper < fitted:
        how += f"; capped at {upper} (rows one step can use)"
    accum = grad_accum_for(recipe, micro, world)
    return with_batch(recipe, micro, accum), BatchChoice(micro, accum, how)
