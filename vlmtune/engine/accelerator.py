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

from vlmtune.config.accelerate import FSDP_KEYS, LaunchSpec, fsdp_problems
from vlmtune.config.schema import Recipe
from vlmtune.engine.distributed import enable_fsdp_on_cpu
from vlmtune.engine.trackers import build_trackers
from vlmtune.errors import UserError
from vlmtune.logging import get_logger

log = get_logger(__name__)


def _minutes(var: str, default: int) -> timedelta:
    return timedelta(minutes=float(os.environ.get(var, default)))


# Collectives wait this long while the model loads (ranks can wait minutes for rank 0 or a slow disk) ...
LOAD_TIMEOUT = _minutes("VLMTUNE_LOAD_TIMEOUT_MIN", 60)
# ... and this long once training runs: a dead or stuck rank then fails the job in minutes, with a message.
STEP_TIMEOUT = _minutes("VLMTUNE_TIMEOUT_MIN", 10)


def build_accelerator(recipe: Recipe, spec: LaunchSpec) -> Accelerator:
    """An Accelerator configured by the recipe (precision, accumulation, trackers, sharding plugins)."""
    check_launch(spec)
    t = recipe.train
    on_cpu = spec.use_cpu or not torch.cuda.is_available()
    # An explicit backend makes accelerate initialise a process group, so name one only for multi-process runs.
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    backend = "gloo" if on_cpu and distributed else None
    # Raise on a failed collective instead of hanging (read by torch when the NCCL group is created).
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    kwargs: dict = {
        "mixed_precision": t.mixed_precision,
        "gradient_accumulation_steps": t.grad_accum,
        "kwargs_handlers": [InitProcessGroupKwargs(backend=backend, timeout=LOAD_TIMEOUT)],
        # accelerate turns DeepSpeed off when asked for `cpu`; without GPUs it runs on the CPU all the same.
        "cpu": on_cpu and not spec.deepspeed,
    }
    if t.report_to:
        kwargs["log_with"] = build_trackers(t)
        kwargs["project_dir"] = t.output_dir
    if spec.deepspeed:
        kwargs["deepspeed_plugin"] = _deepspeed_plugin(recipe, spec)
    elif spec.fsdp:
        if problems := fsdp_problems(spec):
            raise UserError("; ".join(problems))
        kwargs["fsdp_plugin"] = _fsdp_plugin(spec.fsdp_config)
    if t.mixed_precision == "fp16" and on_cpu:
        raise UserError("train.mixed_precision: fp16 needs a GPU; use bf16 or no on CPU")
    accelerator = Accelerator(**kwargs)
    if spec.fsdp and on_cpu and distributed:
        enable_fsdp_on_cpu(accelerator, kwargs["fsdp_plugin"])
    if accelerator.mixed_precision != t.mixed_precision:  # accelerate drops it for multi-process CPU runs
        log.warning(
            "train.mixed_precision %s is not in effect here (%s): this run trains in %s",
            t.mixed_precision, accelerator.distributed_type, accelerator.mixed_precision,
        )  # fmt: skip
    return accelerator


def set_batch_sizes(accelerator: Accelerator, micro_batch_size: int, grad_accum: int) -> None:
    """Train with these batch sizes (chosen after the Accelerator was built: `train.micro_batch_size: auto`,
    `train.global_batch_size`); before `prepare`, which hands DeepSpeed its config."""
    accelerator.gradient_accumulation_steps = grad_accum
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        cfg = plugin.deepspeed_config
        cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
        cfg["gradient_accumulation_steps"] = grad_accum
        cfg["train_batch_size"] = (
            micro_batch_size * grad_accum * accelerator.num_processes
        )  # as accelerate would


def check_launch(spec: LaunchSpec) -> None:
    """Refuse a launch whose sharding or process count contradicts the recipe's accelerate config."""
    dist = spec.distributed_type
    launched_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    launched_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if (launched_ds and not spec.deepspeed) or (launched_fsdp and not spec.fsdp):
        kind = "DeepSpeed" if launched_ds else "FSDP"
        raise UserError(
            f"the launcher enables {kind} but the recipe's launch.accelerate_config says distributed_type {dist}; "
            "launch with the recipe's config (`vlmtune launch RECIPE`) or change launch.accelerate_config"
        )
    expected = spec.num_processes
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # More or fewer processes than the file says is a normal override (`--num_processes`, more nodes); one
    # process when the config wants several means the launcher never read the config.
    if dist != "NO" and expected > 1 and world == 1:
        raise UserError(
            f"the recipe's accelerate config expects {expected} processes ({dist}) but this is a single-process "
            "launch; use `vlmtune launch RECIPE` or `accelerate launch --config_file <that file>`"
        )


def _deepspeed_plugin(recipe: Recipe, spec: LaunchSpec) -> DeepSpeedPlugin:
    t = recipe.train
    if spec.deepspeed_config_file is not None:
        plugin = DeepSpeedPlugin(hf_ds_config=str(spec.deepspeed_config_file))
    else:
        plugin = DeepSpeedPlugin(
            zero_stage=spec.zero_stage,
            offload_optimizer_device=spec.offload_optimizer_device,
            offload_param_device=spec.offload_param_device,
            zero3_init_flag=spec.zero3_init,
            gradient_accumulation_steps=t.grad_accum,
            gradient_clipping=t.max_grad_norm or 0.0,
        )
    cfg = plugin.deepspeed_config
    # We feed batches ourselves (no prepared DataLoader), so DeepSpeed must be told the micro-batch size.
    # micro_batch_size auto is sized once the model is loaded (`set_batch_sizes`, before `prepare`).
    cfg["train_micro_batch_size_per_gpu"] = 1 if t.micro_batch_size == "auto" else t.micro_batch_size
    cfg["gradient_accumulation_steps"] = t.grad_accum
    cfg["gradient_clipping"] = t.max_grad_norm or 0.0  # the recipe decides, also over a JSON file's value
    if t.mixed_precision == "bf16":
        # Skip a step whose gradient norm is NaN/Inf (DeepSpeed does so for fp32 and fp16, for bf16 only if asked).
        bf16 = cfg.setdefault("bf16", {})
        bf16.setdefault("enabled", True)  # accelerate fills "enabled" only when the section is absent
        bf16["check_grad_overflow"] = True
    # Offloaded optimizer state: a LoRA's few million parameters step fast enough with torch's AdamW on the CPU,
    # which also keeps results equal to the other launch modes (DeepSpeedCPUAdam needs a ~1 min JIT build).
    cfg["zero_force_ds_cpu_optimizer"] = False
    return plugin


def _fsdp_plugin(fsdp: dict) -> FullyShardedDataParallelPlugin:
    kwargs = {FSDP_KEYS[k.removeprefix("fsdp_")]: v for k, v in fsdp.items()}  # keys checked by fsdp_problems
    if isinstance(kwargs.get("auto_wrap_policy"), str):
        kwargs["auto_wrap_policy"] = kwargs["auto_wrap_policy"].lower()
    if isinstance(kwargs.get("transformer_cls_names_to_wrap"), str):
        kwargs["transformer_cls_names_to_wrap"] = kwargs["transformer_cls_names_to_wrap"].split(",")
    kwargs["fsdp_version"] = 2
    return FullyShardedDataParallelPlugin(**kwargs)
