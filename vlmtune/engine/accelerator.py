"""Build the Accelerator from the recipe and its accelerate config file.

The recipe's accelerate config is read here (not only by `accelerate launch`), so a run started without
`--config_file` still gets the DeepSpeed / FSDP setup the recipe asks for; a launcher that contradicts the
recipe is an error rather than a silently different run.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin, InitProcessGroupKwargs

from vlmtune.config.checks import resolve_path
from vlmtune.config.schema import Recipe
from vlmtune.errors import UserError

# Loading a large model on rank 0 while the others wait can exceed NCCL's default 10 minutes.
DEFAULT_PG_TIMEOUT = timedelta(minutes=int(os.environ.get("VLMTUNE_PG_TIMEOUT_MIN", "60")))


def build_accelerator(recipe: Recipe, accel_cfg: dict) -> Accelerator:
    """An Accelerator configured by the recipe (precision, accumulation, trackers, sharding plugins)."""
    check_launch(accel_cfg)
    t = recipe.train
    dist = str(accel_cfg.get("distributed_type", "NO"))
    on_cpu = bool(accel_cfg.get("use_cpu")) or not torch.cuda.is_available()
    # An explicit backend makes accelerate initialise a process group, so name one only for multi-process runs.
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    backend = "gloo" if on_cpu and distributed else None
    kwargs: dict = {
        "mixed_precision": t.mixed_precision,
        "gradient_accumulation_steps": t.grad_accum,
        "kwargs_handlers": [InitProcessGroupKwargs(backend=backend, timeout=DEFAULT_PG_TIMEOUT)],
        "cpu": on_cpu,
    }
    if t.report_to:
        kwargs["log_with"] = list(t.report_to)
        kwargs["project_dir"] = t.output_dir
    if dist == "DEEPSPEED":
        kwargs["deepspeed_plugin"] = _deepspeed_plugin(recipe, accel_cfg.get("deepspeed_config") or {})
    elif dist == "FSDP":
        kwargs["fsdp_plugin"] = _fsdp_plugin(accel_cfg.get("fsdp_config") or {})
    if t.mixed_precision == "fp16" and on_cpu:
        raise UserError("train.mixed_precision: fp16 needs a GPU; use bf16 or no on CPU")
    return Accelerator(**kwargs)


def check_launch(accel_cfg: dict) -> None:
    """Refuse a launch whose sharding or process count contradicts the recipe's accelerate config."""
    dist = str(accel_cfg.get("distributed_type", "NO"))
    launched_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    launched_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if (launched_ds and dist != "DEEPSPEED") or (launched_fsdp and dist != "FSDP"):
        kind = "DeepSpeed" if launched_ds else "FSDP"
        raise UserError(
            f"the launcher enables {kind} but the recipe's launch.accelerate_config says distributed_type {dist}; "
            "launch with the recipe's config (`vlmtune launch RECIPE`) or change launch.accelerate_config"
        )
    expected = accel_cfg.get("num_processes")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if expected is not None and dist != "NO" and int(expected) != world:
        raise UserError(
            f"the recipe's accelerate config expects num_processes {expected} but this launch has {world} "
            f"process(es); use `accelerate launch --config_file <that file>` or `vlmtune launch RECIPE`"
        )


def _deepspeed_plugin(recipe: Recipe, ds: dict) -> DeepSpeedPlugin:
    t = recipe.train
    config_file = ds.get("deepspeed_config_file")
    if config_file:
        path = resolve_path(config_file, recipe._base_dir)
        plugin = DeepSpeedPlugin(hf_ds_config=str(path))
    else:
        plugin = DeepSpeedPlugin(
            zero_stage=int(ds.get("zero_stage", 2)),
            offload_optimizer_device=ds.get("offload_optimizer_device", "none"),
            offload_param_device=ds.get("offload_param_device", "none"),
            zero3_init_flag=bool(ds.get("zero3_init_flag", False)),
            gradient_accumulation_steps=t.grad_accum,
            gradient_clipping=t.max_grad_norm or 0.0,
        )
    # We feed batches ourselves (no prepared DataLoader), so DeepSpeed must be told the micro-batch size.
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    plugin.deepspeed_config["gradient_accumulation_steps"] = t.grad_accum
    return plugin


def _fsdp_plugin(fsdp: dict) -> FullyShardedDataParallelPlugin:
    # accelerate's config file prefixes every key with `fsdp_`; the plugin takes them without it.
    kwargs = {k.removeprefix("fsdp_"): v for k, v in fsdp.items()}
    kwargs.setdefault("version", 2)
    kwargs["fsdp_version"] = kwargs.pop("version")
    return FullyShardedDataParallelPlugin(**kwargs)
