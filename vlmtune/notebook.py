"""Multi-process training from a notebook: `notebook_launch(recipe, num_processes=2)`.

accelerate's `notebook_launcher` forks the kernel into `num_processes` workers, each running `vlmtune.run`.
Forking needs a kernel that has not touched the GPU or imported bitsandbytes yet, so those are checked first,
with the recipe, and refused with the fix. The workers hand their outcome (result or error) back through a
temporary folder, so the notebook gets a `RunResult` or the same exception a one-process `run` would raise.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from vlmtune.config.prepare import prepare
from vlmtune.errors import (
    EXIT_DIVERGED,
    EXIT_PREEMPTED,
    EXIT_USER_ERROR,
    Preempted,
    TrainingDiverged,
    UserError,
)
from vlmtune.train import RunResult

_OUTCOME = "rank-{rank}.json"
EXIT_CODES = {"Preempted": EXIT_PREEMPTED, "TrainingDiverged": EXIT_DIVERGED}


def notebook_launch(
    recipe, overrides: list[str] | dict | None = None, *, num_processes: int = 2, port: int = 29500
) -> RunResult:
    """Train `recipe` with `num_processes` processes (DDP: one per GPU, or gloo on CPU) started from this kernel.

    Args:
        recipe: a recipe file, a mapping or a `Recipe` (see `vlmtune.load_recipe`).
        overrides: as for `vlmtune.load_recipe`.
        num_processes: processes to start; each trains `micro_batch_size × grad_accum` rows per step.
        port: rendezvous port on this machine.

    Returns:
        The run's `RunResult`, as the main process saw it.

    Raises:
        UserError: a problem in the recipe, data or environment (also: a kernel that already used the GPU or
            imported bitsandbytes, or a DeepSpeed / FSDP accelerate config, which notebooks cannot start).
        TrainingDiverged, Preempted: as `vlmtune.run`.
    """
    prepared = prepare(recipe, overrides)
    recipe, spec = prepared.recipe, prepared.launch
    if spec.deepspeed or spec.fsdp:
        raise UserError(
            f"launch.accelerate_config: notebook_launch starts plain DDP processes, not {spec.distributed_type}; "
            "run `vlmtune launch RECIPE` in a terminal for DeepSpeed or FSDP2"
        )
    if num_processes < 1:
        raise UserError(f"num_processes must be at least 1, got {num_processes}")
    if num_processes == 1:
        from vlmtune.train import run

        return run(recipe)
    _check_kernel_can_fork()
    import torch
    from accelerate import notebook_launcher
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import patch_environment

    # Imported once here instead of in every worker: forked workers inherit them. (Not peft: it imports
    # bitsandbytes, after which accelerate refuses to fork.)
    import vlmtune.data
    import vlmtune.engine.accelerator
    import vlmtune.model.load  # noqa: F401

    # An Accelerator made earlier in this kernel leaves accelerate's shared state set, which notebook_launcher
    # refuses; each worker builds its own.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    # Without CUDA the workers train on the CPU over gloo (the forked workers inherit this).
    env = {} if torch.cuda.is_available() else {"ACCELERATE_USE_CPU": "true"}
    with tempfile.TemporaryDirectory(prefix="vlmtune-nb-") as outcomes, patch_environment(**env):
        try:
            notebook_launcher(
                _worker, args=(recipe, outcomes), num_processes=num_processes, use_port=str(port)
            )
        except Exception:
            _raise_worker_error(Path(outcomes))
            raise
        _raise_worker_error(Path(outcomes))
        main = json.loads((Path(outcomes) / _OUTCOME.format(rank=0)).read_text())
    return RunResult(
        output_dir=Path(main["output_dir"]),
        adapter_dir=Path(main["adapter_dir"]),
        metrics_file=Path(main["metrics_file"]),
        metrics=main["metrics"],
        steps=main["steps"],
    )


def _check_kernel_can_fork() -> None:
    import torch

    if torch.cuda.is_initialized():
        raise UserError(
            "this kernel has already used the GPU, so it cannot fork training processes; restart the kernel and "
            "call notebook_launch before anything touches CUDA (an in-process vlmtune.run does)"
        )
    if "bitsandbytes" in sys.modules:
        raise UserError(
            "bitsandbytes is already imported in this kernel (peft imports it, e.g. during vlmtune.run), and "
            "accelerate refuses to fork after that; restart the kernel and call notebook_launch first"
        )


def _worker(recipe, outcomes: str) -> None:
    """One process: train, then leave the result (rank 0) or the error for the notebook."""
    from vlmtune.train import run

    rank = int(os.environ.get("RANK", "0"))
    path = Path(outcomes) / _OUTCOME.format(rank=rank)
    try:
        result = run(recipe)
    except (UserError, TrainingDiverged, Preempted) as exc:
        kind = type(exc).__name__
        extra = {"step": exc.step} if isinstance(exc, Preempted) else {}
        path.write_text(json.dumps({"error": kind, "message": str(exc), **extra}))
        # A failed exit stops the other workers; the notebook raises the error itself, without this traceback.
        raise SystemExit(EXIT_CODES.get(kind, EXIT_USER_ERROR)) from None
    if rank == 0:
        path.write_text(
            json.dumps(
                {
                    "output_dir": str(result.output_dir),
                    "adapter_dir": str(result.adapter_dir),
                    "metrics_file": str(result.metrics_file),
                    "metrics": result.metrics,
                    "steps": result.steps,
                }
            )
        )


def _raise_worker_error(outcomes: Path) -> None:
    """Re-raise the first worker's vlmtune error (lowest rank) as the notebook's own exception."""
    for path in sorted(outcomes.glob("rank-*.json"), key=lambda p: int(p.stem.split("-")[1])):
        outcome = json.loads(path.read_text())
        kind = outcome.get("error")
        if kind == "Preempted":
            exc = Preempted(outcome["step"], "stopped on request")
            exc.args = (outcome["message"],)
            raise exc from None
        if kind == "TrainingDiverged":
            raise TrainingDiverged(outcome["message"]) from None
        if kind:
            raise UserError(outcome["message"]) from None
