"""What differs between DDP, DeepSpeed ZeRO and FSDP2, in one place: which one is in effect, whether it is the one
the recipe asked for, and how to read the (possibly sharded) trainable weights.
"""

from __future__ import annotations

from contextlib import nullcontext
from datetime import timedelta

import torch
from accelerate.utils import DistributedType

from vlmtune.config.accelerate import LaunchSpec
from vlmtune.errors import UserError
from vlmtune.families import find_family
from vlmtune.logging import get_logger
from vlmtune.model.parts import part_of

log = get_logger(__name__)


def strategy(accelerator) -> str:
    """`none` (one process), `ddp`, `deepspeed` or `fsdp2`."""
    dist = accelerator.distributed_type
    if dist == DistributedType.DEEPSPEED:
        return "deepspeed"
    if dist == DistributedType.FSDP:
        return "fsdp2"
    return "ddp" if accelerator.num_processes > 1 else "none"


def zero_stage(accelerator) -> int:
    return int(accelerator.state.deepspeed_plugin.zero_stage) if strategy(accelerator) == "deepspeed" else 0


def enable_fsdp_on_cpu(accelerator, plugin) -> None:
    """accelerate only turns FSDP on for GPU-like devices; on CPU it silently falls back to DDP.

    The FSDP2 code path itself (fully_shard over gloo) works on CPU, so for CPU runs (tests, laptops) we select it
    explicitly; `check_sharding` then confirms that the parameters really are sharded.
    """
    from accelerate.state import PartialState

    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:
        # Both singletons: every `AcceleratorState()` call copies PartialState's fields over its own.
        PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)


def check_sharding(accelerator, model, spec: LaunchSpec) -> None:
    """After `prepare()`: stop if the sharding in effect is not the one the recipe's accelerate config asked for.

    Fallbacks happen silently otherwise (FSDP on CPU trains plain DDP; a DeepSpeed config without the launcher
    trains one process).
    """
    want = spec.strategy
    have = strategy(accelerator)
    world = accelerator.num_processes
    problem = None
    if want in ("deepspeed", "fsdp2") and have != want:
        problem = f"the accelerate config asks for {want} but {have} is in effect"
    elif have == "deepspeed":
        from deepspeed import DeepSpeedEngine

        stage = spec.zero_stage if spec.deepspeed else zero_stage(accelerator)
        if not isinstance(model, DeepSpeedEngine):
            problem = f"the model is a {type(model).__name__}, not a DeepSpeedEngine"
        elif model.zero_optimization_stage() != stage:
            problem = (
                f"ZeRO stage {model.zero_optimization_stage()} is in effect, the config asks for {stage}"
            )
    elif have == "fsdp2":
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        trainable = [p for p in model.parameters() if p.requires_grad]
        if not isinstance(model, FSDPModule) or not all(isinstance(p, DTensor) for p in trainable):
            problem = "the model was not sharded by FSDP2 (no fully_shard wrapper / DTensor parameters)"
    elif have == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(model, DistributedDataParallel):
            problem = (
                f"{world} processes but the model is a {type(model).__name__}, not DistributedDataParallel"
            )
    if problem:
        raise UserError(
            f"sharding check failed after prepare(): {problem} ({world} process(es)). Launch with "
            "`vlmtune launch RECIPE` (or `accelerate launch --config_file <the recipe's accelerate config>`)"
        )
    stage = f", ZeRO-{zero_stage(accelerator)}" if have == "deepspeed" else ""
    log.info("distributed: %s over %d process(es)%s", have, world, stage)


def configure_ddp(accelerator, model) -> None:
    """Turn on DDP's unused-parameter detection exactly when a trainable parameter may go unused.

    Trainable parameters in the vision tower or projector of a VLM get no gradient from a text-only batch (unless
    `vision_sync` runs the tower anyway), and Mllama's cross-attention layers none at all, which DDP reports as an
    error unless find_unused_parameters is on. The detection walks the autograd graph every
    step, so it stays off when every trainable parameter takes part in every forward (a text model's LoRA).
    """
    from accelerate.utils import DistributedDataParallelKwargs

    config = getattr(model, "config", None)
    family = find_family(config) if config is not None else None
    optional = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and family and (family.cross_attention_images or part_of(n, family) != "language")
    ]
    accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=bool(optional))
    if optional and strategy(accelerator) == "ddp":
        log.info(
            "DDP: find_unused_parameters on (%d trainable parameters outside the language model)",
            len(optional),
        )


def params_without_grad(model) -> list[str]:
    """Trainable parameters that the last backward left without a gradient."""
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def unused_parameters_error(exc: RuntimeError, names: list[str]) -> UserError | None:
    """DDP's 'Expected to have finished reduction' error, rewritten to name the parameters that got no gradient."""
    if "Expected to have finished reduction" not in str(exc):
        return None
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    return UserError(
        "DDP: some trainable parameters received no gradient in the previous step"
        + (f" ({shown})" if names else "")
        + ". They are in a part of the model that this batch did not use; freeze them (lora.target_modules, "
        "vision.tower) or report the model so its family marks them optional"
    )


def trainable_state_dict(accelerator, model) -> dict[str, torch.Tensor]:
    """Full (unsharded) copies of the trainable parameters, on CPU, keyed like `model.state_dict()`.

    A collective under ZeRO-3 and FSDP2: only the trainable parameters are gathered, never the frozen base, so
    saving a LoRA adapter of a 70B model costs megabytes. Every rank gets the dict.
    """
    unwrapped = accelerator.unwrap_model(model)
    named = [(n, p) for n, p in unwrapped.named_parameters() if p.requires_grad]
    gather = nullcontext()
    if zero_stage(accelerator) == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
    with gather:
        out = {}
        for name, p in named:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p.data
            out[name] = t.detach().to("cpu", copy=True)
    return out


def set_collective_timeout(accelerator, timeout: timedelta) -> None:
    """Change the default process group's timeout once loading is over (a hang then fails in minutes, not hours)."""
    dist = torch.distributed
    if accelerator.num_processes < 2 or not dist.is_initialized():
        return
    try:
        dist.set_timeout(timeout)
    except (AttributeError, RuntimeError) as exc:  # older torch, or a backend without it
        log.warning("could not shorten the collective timeout (%s); keeping the loading timeout", exc)


def fsdp2_lazy_init(model: torch.nn.Module) -> bool:
    """Run FSDP2's lazy initialisation of `model` now, if it is an FSDP2 root; whether it is one.

    FSDP2 initialises on the first forward, and fixes then each parameter group's gradient dtypes from the
    parameters that require grad at that moment. A first forward with the LoRA adapter disabled (DPO's reference
    pass: PEFT turns the adapter's `requires_grad` off) would leave mixed-dtype groups (fp32 LoRA weights beside
    bf16 4-bit storage) without a dtype to reduce gradients to. An FSDP2 internal, guarded; every rank calls it.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    if not isinstance(model, FSDPModule):
        return False
    state = model._get_fsdp_state()
    if hasattr(state, "_lazy_init"):
        state._lazy_init()
    return True
