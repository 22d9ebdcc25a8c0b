"""Wrap the base model with a PEFT LoRA adapter (and k-bit preparation for quantised models)."""

from __future__ import annotations

from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import PreTrainedModel

from vlmtune.config.schema import LoraConfig
from vlmtune.errors import UserError
from vlmtune.logging import get_logger

log = get_logger(__name__)

_GC_KWARGS = {"use_reentrant": False}  # non-reentrant checkpointing needs no input grads and works with PEFT


def apply_lora(
    model: PreTrainedModel, cfg: LoraConfig, *, quantized: bool, gradient_checkpointing: bool
) -> PeftModel:
    """Freeze the base, add LoRA adapters, enable gradient checkpointing; log trainable parameter counts."""
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
        target_modules=cfg.target_modules,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        modules_to_save=cfg.modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, peft_cfg)
    except ValueError as exc:
        names = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name})
        raise UserError(
            f"lora.target_modules: {exc}. Module names in this model include: {', '.join(names[:40])}"
        ) from None
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
