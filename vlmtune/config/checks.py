"""Rules that span several recipe fields, and checks of the machine the recipe will run on.

`cross_field_problems` needs only the recipe; `environment_problems` looks at files, installed packages and
the output directory, without loading any weights (this is what `vlmtune validate` runs).
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path

import yaml

from vlmtune.config.schema import Recipe
from vlmtune.errors import UserError

ACCELERATE_DISTRIBUTED_TYPES = ("NO", "MULTI_GPU", "MULTI_CPU", "DEEPSPEED", "FSDP")


def resolve_path(value: str | Path, base_dir: Path | None) -> Path:
    """A recipe path: as given (absolute or from the working directory), else relative to the recipe file."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists() or base_dir is None:
        return path.resolve() if path.exists() else path
    candidate = base_dir / path
    return candidate.resolve() if candidate.exists() else path


def recipe_warnings(recipe: Recipe) -> list[str]:
    """Allowed but risky settings, each as `key.path: why`; logged by `train` and printed by `validate`."""
    warnings = []
    m = recipe.model
    t = recipe.train
    if t.activation_offloading and not t.gradient_checkpointing:
        warnings.append(
            "train.activation_offloading: without gradient_checkpointing every activation is copied to the CPU "
            "and back in each step, which is slow; set train.gradient_checkpointing: true"
        )
    if m.trust_remote_code and not m.revision:
        warnings.append(
            "model.trust_remote_code: true runs Python code from the model repository, and with no model.revision "
            "pinned that code can change between runs; pin a commit hash in model.revision"
        )
    return warnings


def cross_field_problems(recipe: Recipe) -> list[str]:
    """Combinations of valid values that cannot work together, each as `key.path: reason`."""
    t, q, lora = recipe.train, recipe.quant, recipe.lora
    problems = []
    if t.mixed_precision == "fp16" and recipe.model.dtype == "bfloat16":
        problems.append(
            "train.mixed_precision: fp16 with model.dtype bfloat16 mixes two half types; "
            "use mixed_precision bf16, or model.dtype float16/float32"
        )
    if t.mixed_precision == "bf16" and recipe.model.dtype == "float16":
        problems.append("train.mixed_precision: bf16 with model.dtype float16; use model.dtype bfloat16")
    if q is not None and q.bits == 8 and lora.use_dora:
        problems.append(
            "lora.use_dora: DoRA on 8-bit weights is not supported by peft; use quant.bits 4 or no quant"
        )
    if t.eval_every > 0 and not recipe.data.eval:
        problems.append("train.eval_every: evaluation is scheduled but data.eval lists no source")
    if (
        recipe.checkpoint.every
        and recipe.train.max_steps
        and recipe.checkpoint.every > recipe.train.max_steps
    ):
        problems.append(
            f"checkpoint.every: {recipe.checkpoint.every} is more than train.max_steps "
            f"({recipe.train.max_steps}); no intermediate checkpoint would be written"
        )
    return problems + batching_problems(recipe) + vision_problems(recipe)


def vlm_packing_problem(batching: str, family: str) -> str | None:
    """Why `data.batching` (padding_free / packed) cannot be used with this vision-language family; None when it
    can. The reason lives in the family registry (`Family.packing_refused`), where the tests that prove packing
    for the other families read it too."""
    from vlmtune.model.families import FAMILIES

    reason = FAMILIES[family].packing_refused if family in FAMILIES else ""
    if batching == "padded" or not reason:
        return None
    return (
        f"data.batching: {batching} is not supported for {family} models: {reason}; use data.batching: padded "
        "(data.group_by_length and train.micro_batch_tokens also cut padding)"
    )


def batching_problems(recipe: Recipe) -> list[str]:
    """Rules of `data.batching`, `data.pack_length`, `data.group_by_length` and `train.micro_batch_tokens`."""
    d, t, problems = recipe.data, recipe.train, []
    if d.pack_length is not None and d.batching != "packed":
        problems.append(
            f"data.pack_length: only used with data.batching: packed (now {d.batching}); remove it or pack"
        )
    if d.pack_length is not None and d.pack_length < d.max_length:
        problems.append(
            f"data.pack_length: {d.pack_length} is less than data.max_length ({d.max_length}), so the longest "
            "rows would fit no bin; raise pack_length or lower max_length"
        )
    if d.group_by_length and d.batching != "padded":
        problems.append(
            f"data.group_by_length: groups rows to cut padding, and data.batching {d.batching} has none; "
            "remove group_by_length"
        )
    if recipe.model.family is not None and (problem := vlm_packing_problem(d.batching, recipe.model.family)):
        problems.append(problem)
    if t.micro_batch_tokens is not None:
        if d.batching == "packed":
            problems.append(
                "train.micro_batch_tokens: with data.batching: packed a micro-batch is train.micro_batch_size "
                "bins of data.pack_length tokens; set those instead"
            )
        if d.group_by_length:
            problems.append(
                "data.group_by_length: token-budget micro-batches (train.micro_batch_tokens) are already "
                "grouped by length; remove group_by_length"
            )
        if t.micro_batch_tokens < d.max_length:
            problems.append(
                f"train.micro_batch_tokens: {t.micro_batch_tokens} is less than data.max_length "
                f"({d.max_length}), so the longest rows would fit no micro-batch; raise it or lower max_length"
            )
    return problems


def vision_problems(recipe: Recipe) -> list[str]:
    """Rules of the `vision` section (and, when `model.family` is given, what that family supports)."""
    from vlmtune.model.families import FAMILIES

    v, problems = recipe.vision, []
    for part in ("tower", "projector"):
        if getattr(v, part) == "frozen" and getattr(v, f"{part}_lr") is not None:
            problems.append(
                f"vision.{part}_lr: the {part} is frozen (vision.{part}: frozen), so it has no learning rate; "
                f"set vision.{part} to lora or full, or remove vision.{part}_lr"
            )
    if v.min_pixels and v.max_pixels and v.min_pixels > v.max_pixels:
        problems.append(f"vision.min_pixels: {v.min_pixels} is more than vision.max_pixels ({v.max_pixels})")
    family = FAMILIES.get(recipe.model.family) if recipe.model.family else None
    if family is not None:
        problems += image_size_problems(recipe, family)
    if recipe.quant is not None and recipe.quant.vision == "quantized" and "full" in (v.tower, v.projector):
        part = "tower" if v.tower == "full" else "projector"
        problems.append(
            f"vision.{part}: full training of a quantised {part} is not possible; set quant.vision: float "
            "(keeps the tower and projector unquantised), or train it with lora"
        )
    return problems


def image_size_problems(recipe: Recipe, family) -> list[str]:
    """Image-size keys of the recipe that `family` does not take."""
    problems = []
    for key, value in recipe.vision.image_size().items():
        if value is not None and key not in family.size_keys:
            takes = ", ".join(f"vision.{k}" for k in family.size_keys) or "none: the vision config fixes it"
            problems.append(
                f"vision.{key}: not an image-size setting of {family.name} models (image-size keys: {takes})"
            )
    return problems


def load_accelerate_config(recipe: Recipe) -> dict:
    """The recipe's accelerate config file as a mapping ({} when the recipe names none)."""
    name = recipe.launch.accelerate_config
    if not name:
        return {}
    path = resolve_path(name, recipe._base_dir)
    if not path.is_file():
        raise UserError(
            f"launch.accelerate_config: file not found: {name} (looked in {Path.cwd()}"
            + (f" and {recipe._base_dir}" if recipe._base_dir else "")
            + "); the shipped ones are in accelerate_configs/"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"launch.accelerate_config: {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"launch.accelerate_config: {path} must be a mapping")
    dist = str(data.get("distributed_type", "NO"))
    if dist not in ACCELERATE_DISTRIBUTED_TYPES:
        raise UserError(
            f"launch.accelerate_config: {path}: distributed_type {dist!r} is not one of "
            f"{', '.join(ACCELERATE_DISTRIBUTED_TYPES)}"
        )
    return data


def environment_problems(recipe: Recipe) -> list[str]:
    """Everything that can be checked without loading weights: files, packages, writable output."""
    problems: list[str] = []
    base = recipe._base_dir

    model_path = Path(recipe.model.path).expanduser()
    local_looking = recipe.model.path.startswith((".", "/", "~")) or model_path.exists()
    if local_looking:
        resolved = resolve_path(recipe.model.path, base)
        if not (resolved / "config.json").is_file():
            problems.append(
                f"model.path: {recipe.model.path} is not a model directory (no config.json there); "
                "give a local model folder or a hub id such as Qwen/Qwen2.5-7B-Instruct"
            )
        elif recipe.model.family is None:  # the family comes from the config: check what depends on it
            problems += _detected_family_problems(recipe, resolved / "config.json")
    elif recipe.model.path.count("/") > 1 or " " in recipe.model.path:
        problems.append(
            f"model.path: {recipe.model.path!r} is neither an existing folder nor a hub id (org/name)"
        )

    for split in ("train", "eval"):
        for i, src in enumerate(getattr(recipe.data, split)):
            if not resolve_path(src.path, base).exists():
                problems.append(f"data.{split}.{i}.path: file not found: {src.path} (looked in {Path.cwd()})")
            if src.image_root and not resolve_path(src.image_root, base).is_dir():
                problems.append(
                    f"data.{split}.{i}.image_root: not a folder: {src.image_root} (looked in {Path.cwd()})"
                )

    try:
        accel = load_accelerate_config(recipe)
    except UserError as exc:
        problems.append(str(exc))
        accel = {}
    problems += _accelerate_problems(recipe, accel)

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

    resume = recipe.checkpoint.resume
    if resume not in ("auto", "never"):
        ckpt = resolve_path(resume, base)
        if not (ckpt / "COMPLETE").is_file():
            problems.append(
                f"checkpoint.resume: {resume} is not a complete checkpoint (no COMPLETE marker); "
                "use `auto` to take the newest complete one"
            )

    problem = _unwritable(Path(recipe.train.output_dir).expanduser())
    if problem:
        problems.append(f"train.output_dir: {problem}")
    return problems


def _detected_family_problems(recipe: Recipe, config_file: Path) -> list[str]:
    from vlmtune.model.families import find_family

    try:
        family = find_family(json.loads(config_file.read_text()))
    except (OSError, ValueError) as exc:
        return [f"model.path: cannot read {config_file}: {exc}"]
    return image_size_problems(recipe, family) if family is not None else []


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

# accelerate config file `fsdp_config` keys (without their `fsdp_` prefix) → FullyShardedDataParallelPlugin fields.
FSDP_KEYS = {
    "version": "fsdp_version", "offload_params": "cpu_offload",
    "transformer_layer_cls_to_wrap": "transformer_cls_names_to_wrap",
    **{k: k for k in (
        "reshard_after_forward", "auto_wrap_policy", "state_dict_type", "cpu_ram_efficient_loading",
        "activation_checkpointing", "sync_module_states", "use_orig_params", "forward_prefetch",
        "backward_prefetch", "sharding_strategy", "min_num_params",
    )},
}  # fmt: skip


def fsdp_problems(fsdp: dict) -> list[str]:
    problems = []
    for key in fsdp:
        if key.removeprefix("fsdp_") not in FSDP_KEYS:
            known = ", ".join(sorted("fsdp_" + k for k in FSDP_KEYS))
            problems.append(f"launch.accelerate_config: unknown fsdp_config key {key!r} (known: {known})")
    version = fsdp.get("fsdp_version", fsdp.get("version", 2))
    if str(version) != "2":
        problems.append(
            f"launch.accelerate_config: fsdp_version {version}: vlmtune supports FSDP2 only; set fsdp_version: 2"
        )
    return problems


def _accelerate_problems(recipe: Recipe, accel: dict) -> list[str]:
    dist = str(accel.get("distributed_type", "NO"))
    ds = accel.get("deepspeed_config") or {}
    problems = fsdp_problems(accel.get("fsdp_config") or {}) if dist == "FSDP" else []
    if dist == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        problems.append("launch.accelerate_config: DeepSpeed config but deepspeed is not installed")
    if dist == "DEEPSPEED" and recipe.train.compile:
        problems.append(
            "train.compile: vlmtune does not compile under DeepSpeed (its ZeRO hooks gather parameters around "
            "each module, which torch.compile graphs do not see); set train.compile: false, or use DDP / FSDP"
        )
    q = recipe.quant
    sharded_params = (dist == "DEEPSPEED" and int(ds.get("zero_stage", 0)) == 3) or dist == "FSDP"
    if sharded_params and recipe.train.loss == "liger":
        problems.append(
            "train.loss: liger needs the whole output head on every GPU, which ZeRO-3 / FSDP parameter sharding "
            "splits; use train.loss: chunked (it gathers the head), or DDP / ZeRO-2"
        )
    targets = recipe.lora.target_modules if isinstance(recipe.lora.target_modules, list) else []
    head_trains = [m for m in recipe.lora.modules_to_save + targets if "lm_head" in m]
    if sharded_params and recipe.train.loss == "chunked" and head_trains:
        problems.append(
            f"train.loss: chunked under ZeRO-3 / FSDP needs a frozen output head, and the recipe trains "
            f"{head_trains[0]!r} (lora.modules_to_save / target_modules); use train.loss: standard, or DDP / ZeRO-2"
        )
    if q is not None and sharded_params:
        if q.bits == 8:
            problems.append(
                "quant.bits: 8-bit weights cannot be sharded by ZeRO-3 / FSDP; use 4-bit with "
                "quant.storage_dtype bfloat16, or ZeRO-2 / DDP"
            )
        elif q.storage_dtype != recipe.model.dtype:
            problems.append(
                f"quant.storage_dtype: ZeRO-3 / FSDP shard 4-bit weights only when they are stored in the "
                f"model's float dtype; set quant.storage_dtype: {recipe.model.dtype} (now {q.storage_dtype})"
            )
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
