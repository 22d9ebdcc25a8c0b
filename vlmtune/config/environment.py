"""Checks of the machine a recipe will run on: files, installed packages, the model's kind, a writable output.

Nothing here loads weights; this is what `vlmtune validate` (and every entry point, before torch) runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path

from vlmtune.config.accelerate import LaunchSpec, launch_problems, load_launch_spec
from vlmtune.config.paths import is_hub_id, resolve_path
from vlmtune.config.rules import family_problems
from vlmtune.config.schema import Recipe
from vlmtune.errors import UserError
from vlmtune.families import find_family
from vlmtune.layout import is_complete

# train.report_to name → (module accelerate imports for it, package to pip install). tensorboard is a dependency.
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "comet_ml": ("comet_ml", "comet-ml"),
    "aim": ("aim", "aim"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
    "swanlab": ("swanlab", "swanlab"),
    "trackio": ("trackio", "trackio"),
}


def environment_problems(recipe: Recipe) -> list[str]:
    """Everything that can be checked without loading weights: files, packages, writable output."""
    return check_environment(recipe)[1]


def check_environment(recipe: Recipe) -> tuple[LaunchSpec | None, list[str]]:
    """The recipe's launch spec (None when its accelerate config cannot be read) and every environment problem.

    Each check needs only the fields it reads, so it runs even when cross-field rules found problems.
    """
    problems = _model_problems(recipe) + _data_problems(recipe) + _reward_problems(recipe)
    try:
        spec = load_launch_spec(recipe)
    except UserError as exc:
        problems.append(str(exc))
        spec = None
    else:
        problems += launch_problems(recipe, spec)
        if spec.deepspeed and importlib.util.find_spec("deepspeed") is None:
            problems.append("launch.accelerate_config: DeepSpeed config but deepspeed is not installed")
    problems += _package_problems(recipe)

    resume = recipe.checkpoint.resume
    if resume not in ("auto", "never") and not is_complete(resolve_path(resume, recipe._base_dir)):
        problems.append(
            f"checkpoint.resume: {resume} is not a complete checkpoint (no COMPLETE marker); "
            "use `auto` to take the newest complete one"
        )
    problem = _unwritable(Path(recipe.train.output_dir).expanduser())
    if problem:
        problems.append(f"train.output_dir: {problem}")
    return spec, problems


def _model_problems(recipe: Recipe) -> list[str]:
    """A model path that is neither a model folder nor a hub id; what the model's kind (detected) refuses."""
    path = recipe.model.path
    local_looking = path.startswith((".", "/", "~")) or Path(path).expanduser().exists()
    if local_looking:
        config_file = resolve_path(path, recipe._base_dir) / "config.json"
        if not config_file.is_file():
            return [
                f"model.path: {path} is not a model directory (no config.json there); "
                "give a local model folder or a hub id such as Qwen/Qwen2.5-7B-Instruct"
            ]
    elif path.count("/") > 1 or " " in path:
        return [f"model.path: {path!r} is neither an existing folder nor a hub id (org/name)"]
    else:
        config_file = _cached_hub_config(recipe)
    if recipe.model.family is not None or config_file is None:
        return []  # a given family is checked by the cross-field rules; an uncached hub model by `train`
    try:
        family = find_family(json.loads(config_file.read_text()))
    except (OSError, ValueError) as exc:
        return [f"model.path: cannot read {config_file}: {exc}"]
    return family_problems(recipe, family)


def _cached_hub_config(recipe: Recipe) -> Path | None:
    """The hub model's config.json when it is in the local hub cache (no network), else None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(recipe.model.path, "config.json", revision=recipe.model.revision)
    except Exception:  # not a valid repo id, no cache: `train` finds out with the config
        return None
    return Path(found) if isinstance(found, str) else None


def _data_problems(recipe: Recipe) -> list[str]:
    problems, base = [], recipe._base_dir
    for split in ("train", "eval"):
        for i, src in enumerate(getattr(recipe.data, split)):
            if not resolve_path(src.path, base).exists() and not is_hub_id(src.path):
                problems.append(
                    f"data.{split}.{i}.path: file not found: {src.path} (looked in {Path.cwd()}; a hub dataset is "
                    "named org/name)"
                )
            if src.image_root and not resolve_path(src.image_root, base).is_dir():
                problems.append(
                    f"data.{split}.{i}.image_root: not a folder: {src.image_root} (looked in {Path.cwd()})"
                )
    return problems


def _reward_problems(recipe: Recipe) -> list[str]:
    """A user reward's file exists (its function is looked up when training loads it: that runs the file)."""
    problems = []
    for i, spec in enumerate(recipe.grpo.rewards if recipe.grpo is not None else []):
        if spec.function is None:
            continue
        path, sep, name = spec.function.rpartition(":")
        if not sep or not name or not path.endswith(".py"):
            problems.append(f"grpo.rewards.{i}.function: {spec.function!r} is not path/to/file.py:func")
        elif not resolve_path(path, recipe._base_dir).is_file():
            problems.append(
                f"grpo.rewards.{i}.function: file not found: {path} (looked in {Path.cwd()} and the recipe's folder)"
            )
    return problems


def _package_problems(recipe: Recipe) -> list[str]:
    problems = []
    needs_bnb = recipe.quant is not None or recipe.train.optimizer != "adamw"
    if needs_bnb and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("quant / train.optimizer: bitsandbytes is not installed (pip install bitsandbytes)")
    if (
        recipe.model.attn_implementation == "flash_attention_2"
        and importlib.util.find_spec("flash_attn") is None
    ):
        problems.append("model.attn_implementation: flash_attention_2 needs the flash-attn package; use sdpa")
    if recipe.train.loss == "liger" and importlib.util.find_spec("liger_kernel") is None:
        problems.append(
            "train.loss: liger needs the liger-kernel package (pip install 'vlmtune[liger]'); or use chunked"
        )
    for tracker in recipe.train.report_to:
        module, package = TRACKER_PACKAGES[tracker]
        if importlib.util.find_spec(module) is None:
            problems.append(f"train.report_to: {tracker} needs the {package} package (pip install {package})")
    return problems


def _unwritable(path: Path) -> str | None:
    """Why `path` cannot be written (its nearest existing parent is checked), or None."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return f"{path}: no existing parent directory"
        probe = probe.parent
    if not probe.is_dir():
        return f"{path}: {probe} exists and is not a directory"
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".vlmtune-write-test-"):
            pass
    except OSError as exc:
        return f"{path} is not writable ({exc.strerror}: {probe}); choose another train.output_dir"
    if not os.access(probe, os.W_OK):
        return f"{path} is not writable; choose another train.output_dir"
    return None
