"""Training methods beyond supervised fine-tuning, each behind the loop's `engine.method.Method` seam.

`method: sft` is the loop's own `Supervised`; dpo, grpo and distill live here, one module each, and share the
loop, checkpoints and metrics with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtune.config.schema import Recipe
from vlmtune.engine.method import Method


@dataclass
class MethodContext:
    """What a method is built from: the prepared (wrapped) model and the run's pieces."""

    recipe: Recipe
    accelerator: Any
    model: Any  # wrapped by accelerator.prepare (DDP / DeepSpeed engine / FSDP)
    processor: Any  # a text model's tokenizer, or a VLM's processor
    family: Any  # vlmtune.families.Family, None for a text model
    output_dir: Path
    # The image a text-only batch runs through the vision tower so sharded processes stay in step
    # (`engine.vision_sync`); None where the run needs none.
    vision_inputs: dict[str, Any] | None = None


def build_method(ctx: MethodContext) -> Method | None:
    """The recipe's method; None for sft (the loop's default)."""
    name = ctx.recipe.method
    if name == "sft":
        return None
    if name == "dpo":
        from vlmtune.config.schema import DpoConfig
        from vlmtune.methods.dpo import Dpo

        return Dpo(ctx.recipe.dpo or DpoConfig(), ctx.model, ctx.accelerator.device)
    if name == "grpo":
        return _grpo(ctx)
    if name == "distill":
        from vlmtune.methods.distill import build

        return build(ctx)
    raise NotImplementedError(f"method {name}")


def _grpo(ctx: MethodContext) -> Method:
    from vlmtune.errors import UserError
    from vlmtune.methods.grpo import GRPO
    from vlmtune.methods.rewards import load_rewards

    if ctx.family is not None and ctx.family.image_grid == "cross_attention":
        # Its cross_attention_mask has one entry per token and image tile: sampled completions would need it
        # extended with the family's rule, which no test covers yet.
        raise UserError(
            f"method: grpo does not support {ctx.family.name} models yet (their cross-attention mask is per "
            "token and would have to grow with each sampled completion); use a decoder-only VLM family such as "
            "qwen2_5_vl, or method: sft / dpo"
        )

    rewards = load_rewards(
        ctx.recipe.grpo.rewards, base_dir=ctx.recipe._base_dir, family=ctx.family, processor=ctx.processor
    )
    return GRPO(
        ctx.recipe.grpo,
        model=ctx.model,
        accelerator=ctx.accelerator,
        tokenizer=getattr(ctx.processor, "tokenizer", ctx.processor),
        rewards=rewards,
        output_dir=ctx.output_dir,
        seed=ctx.recipe.train.seed,
        token_pad=ctx.family.token_pad if ctx.family is not None else None,
    )
