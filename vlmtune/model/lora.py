"""Wrap the base model with a PEFT LoRA adapter (and k-bit preparation for quantised models).

For a vision-language model the adapter covers the language model, plus the vision tower and projector as the
recipe's `vision` section says: `lora` adds adapters to their linear layers, `full` trains the part whole (as
PEFT `modules_to_save`, so it is saved in the adapter and reloads with plain PEFT), `frozen` leaves it without
gradients.
"""

from __future__ import annotations

import re

from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import PreTrainedModel

from vlmtune.config.schema import LoraConfig, VisionConfig
from vlmtune.errors import UserError
from vlmtune.families import Family
from vlmtune.logging import get_logger
from vlmtune.model.parts import lm_lora_targets, nested_parts, part_linear_layers, part_modules, part_of

log = get_logger(__name__)

_GC_KWARGS = {"use_reentrant": False}  # non-reentrant checkpointing needs no input grads and works with PEFT


def apply_lora(
    model: PreTrainedModel,
    cfg: LoraConfig,
    *,
    quantized: bool,
    gradient_checkpointing: bool,
    family: Family | None = None,
    vision: VisionConfig | None = None,
) -> PeftModel:
    """Freeze the base, add LoRA adapters, enable gradient checkpointing; log trainable parameter counts.

    Args:
        family: The VLM family (None for a text model): `target_modules` then covers the language model only.
        vision: How the vision tower and projector train (frozen when not given).
    """
    target_modules, modules_to_save = cfg.target_modules, list(cfg.modules_to_save)
    if family is not None:
        vision = vision or VisionConfig()
        target_modules, full = vlm_targets(model, family, cfg, vision)
        modules_to_save += full
    if quantized:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=_GC_KWARGS,
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=_GC_KWARGS)

    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_modules,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, peft_cfg)
    except ValueError as exc:
        names = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name})
        raise UserError(
            f"lora.target_modules: {exc}. Module names in this model include: {', '.join(names[:40])}"
        ) from None
    if family is not None:
        _freeze_frozen_parts(peft_model, family, vision)
    trainable, total = count_parameters(peft_model)
    log.info(
        "LoRA r=%d alpha=%g on %s: %s trainable of %s parameters (%.3f%%)",
        cfg.r,
        cfg.alpha,
        cfg.target_modules,
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / max(total, 1),
    )
    return peft_model


def vlm_targets(
    model: PreTrainedModel, family: Family, cfg: LoraConfig, vision: VisionConfig
) -> tuple[str, list[str]]:
    """PEFT `target_modules` (a regex) and the `modules_to_save` for a VLM.

    `all-linear` (or a list of names) means the language model's layers only; the linear layers of a part set
    to `lora` are named in full, so a tower layer never takes a projector layer's adapter or the other way round.

    Raises:
        UserError: a part set to `lora` has no linear layer, or `full` cannot be saved for the family's layout.
    """
    if cfg.target_modules == "all-linear":
        language = lm_lora_targets(model, family)
    else:
        lm = "|".join(re.escape(p) for p in family.language)
        names = "|".join(re.escape(n) for n in cfg.target_modules)
        language = rf"(?:.*\.)?(?:{lm})\.(?:.*\.)?(?:{names})"
    alternatives, full = [language], []
    for part, mode in (("vision", vision.tower), ("projector", vision.projector)):
        key = "tower" if part == "vision" else "projector"
        if mode == "lora":
            layers = part_linear_layers(model, family, part)
            if not layers:
                raise UserError(
                    f"vision.{key}: lora needs linear layers, and the {family.name} {key} has none; "
                    "use full or frozen"
                )
            alternatives.append("|".join(re.escape(n) for n in layers))
        elif mode == "full":
            modules, bare = part_modules(model, family, part)
            if bare:
                log.warning(
                    "vision.%s: full trains modules only; %s (a bare parameter) stays frozen",
                    key,
                    ", ".join(bare),
                )
            full += [n for m in modules for n in _savable(model, m)]
    if nested_parts(family) and vision.tower == "full" and vision.projector == "lora":
        raise UserError(
            f"vision.projector: lora inside a fully trained tower is not possible for {family.name} (its "
            "projector sits inside the tower's module); set vision.projector to full or frozen"
        )
    return "|".join(f"(?:{a})" for a in alternatives), full


def _savable(model: PreTrainedModel, name: str) -> list[str]:
    """PEFT wraps a module in `modules_to_save` to train and save it, which it cannot do to a container
    (Qwen3-VL's `deepstack_merger_list`): name the container's members instead."""
    from torch import nn

    module = model.get_submodule(name)
    if isinstance(module, nn.ModuleList | nn.ModuleDict):
        return [f"{name}.{child}" for child, _ in module.named_children()]
    return [name]


def _freeze_frozen_parts(model: PeftModel, family: Family, vision: VisionConfig) -> None:
    """No gradient for a frozen part, even inside a fully trained one (Qwen-VL's merger inside its tower)."""
    modes = {"vision": vision.tower, "projector": vision.projector}
    for name, p in model.named_parameters():
        if p.requires_grad and modes.get(part_of(name, family)) == "frozen":
            p.requires_grad_(False)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count as their unpacked size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
