"""vlmtune: LoRA / QLoRA fine-tuning of LLMs and VLMs on Accelerate and PEFT.

The Python API (for notebooks and scripts)::

    import vlmtune

    recipe = vlmtune.load_recipe("recipes/demo/tiny_lora.yaml", {"train.max_steps": 10})
    result = vlmtune.run(recipe)                                # train in this process
    result.metrics, result.adapter_dir, result.history          # final metrics, adapter, every metrics record
    result = vlmtune.notebook_launch(recipe, num_processes=2)   # several processes, started from a notebook

Importing this package is cheap: it creates no Accelerator, touches no GPU and imports neither torch nor
bitsandbytes; each name below is imported on first use. (Training is `run`, not `train`: `vlmtune.train` is
the module behind `accelerate launch -m vlmtune.train`.)
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# Public name → the module that defines it.
_EXPORTS = {
    "load_recipe": "vlmtune.config.load",
    "Recipe": "vlmtune.config.schema",
    "run": "vlmtune.train",
    "RunResult": "vlmtune.train",
    "notebook_launch": "vlmtune.notebook",
    "read_metrics": "vlmtune.engine.metrics",
    "UserError": "vlmtune.errors",
    "RecipeError": "vlmtune.errors",
    "TrainingDiverged": "vlmtune.errors",
    "Preempted": "vlmtune.errors",
}
__all__ = [
    "Preempted",
    "Recipe",
    "RecipeError",
    "RunResult",
    "TrainingDiverged",
    "UserError",
    "__version__",
    "load_recipe",
    "notebook_launch",
    "read_metrics",
    "run",
]

if TYPE_CHECKING:
    from vlmtune.config.load import load_recipe
    from vlmtune.config.schema import Recipe
    from vlmtune.engine.metrics import read_metrics
    from vlmtune.errors import Preempted, RecipeError, TrainingDiverged, UserError
    from vlmtune.notebook import notebook_launch
    from vlmtune.train import RunResult, run


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'vlmtune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
