"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from vlmtune.config.schema import TrainConfig, VisionConfig
from vlmtune.model.parts import part_of

_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def is_lora_b(name: str) -> bool:
    """A LoRA B matrix (PEFT names them `lora_B` in linear layers, `lora_embedding_B` in embeddings)."""
    return "lora_B." in name or "lora_embedding_B." in name


def build_optimizer(
    model: torch.nn.Module,
    cfg: TrainConfig,
    *,
    family=None,
    vision: VisionConfig | None = None,
    plus_lr_ratio: float | None = None,
) -> torch.optim.Optimizer:
    """AdamW (torch or bitsandbytes 8-bit / paged 8-bit) over the trainable parameters.

    Weight decay applies to matrices only: biases and norm weights (e.g. in modules_to_save) are not decayed.
    For a VLM (`family` given), the vision tower and projector get their own learning rates
    (`vision.tower_lr`, `vision.projector_lr`, default `train.lr`); the schedule scales every group alike.
    LoRA+ (`plus_lr_ratio`, from `lora.plus_lr_ratio`): the LoRA B matrices of each part get their own group at
    that multiple of the part's rate. The schedule multiplies every group's initial rate by the same factor, so
    the ratio holds at every step; the first group is always a base-rate one (the `lr` the metrics report).
    """
    lrs = {"language": cfg.lr}
    if family is not None:
        vision = vision or VisionConfig()
        lrs["vision"] = vision.tower_lr or cfg.lr
        lrs["projector"] = vision.projector_lr or cfg.lr
    groups = []
    for part, lr in lrs.items():
        named = [
            (n, p)
            for n, p in model.named_parameters()
            if p.requires_grad and (family is None or part_of(n, family) == part)
        ]
        plus = [plus_lr_ratio is not None and is_lora_b(n) for n, _ in named]
        b = [p for (_, p), is_b in zip(named, plus, strict=True) if is_b]
        rest = [p for (_, p), is_b in zip(named, plus, strict=True) if not is_b]
        groups += [
            {"params": [p for p in rest if p.ndim >= 2], "weight_decay": cfg.weight_decay, "lr": lr},
            {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0, "lr": lr},
            {"params": b, "weight_decay": cfg.weight_decay, "lr": lr * (plus_lr_ratio or 1.0)},
        ]
    groups = [g for g in groups if g["params"]]
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.adam_betas), "eps": cfg.adam_eps}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    import bitsandbytes as bnb  # lazy: importing bitsandbytes is slow and not always installed

    cls = bnb.optim.AdamW8bit if cfg.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    return cls(groups, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """Linear warmup for `warmup_ratio` of the steps, then cosine / linear decay or a constant rate."""
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    name = _SCHEDULERS[cfg.scheduler]
    if name == "constant_with_warmup":
        return get_scheduler(name, optimizer, num_warmup_steps=warmup)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
