"""Generation with the model being trained: what every caller of `generate` needs (eval samples, GRPO rollouts).

`generate` runs inside the wrappers `accelerator.prepare` adds (DDP, the DeepSpeed engine, FSDP2), past the root
module's forward hooks, in eval mode (no dropout; gradient checkpointing off, so the KV cache is used). Under
ZeRO-3 and FSDP2 every forward is a collective (parameters are gathered layer by layer), so every rank generates
and a rank whose sequences all ended early keeps stepping until every rank is done (`synced_gpus`). Under ZeRO-3
`whole_model_gathered` instead gathers every parameter once for a whole generation, so ranks generate on their
own at full speed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from torch import nn

from vlmtune.engine.distributed import fsdp2_lazy_init, strategy, zero_stage


def generating_module(model: nn.Module) -> nn.Module:
    """The module with `generate` inside DDP / DeepSpeed wrappers (the PEFT model: its adapter is on)."""
    while not hasattr(model, "generate") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    if not hasattr(model, "generate"):
        raise TypeError(f"{type(model).__name__} cannot generate: it is not a generative (causal LM) model")
    return model


def synced_gpus(accelerator) -> bool:
    """Whether ranks must keep stepping together: parameters are sharded (ZeRO-3, FSDP2) over several processes."""
    sharded = zero_stage(accelerator) == 3 or strategy(accelerator) == "fsdp2"
    return sharded and accelerator.num_processes > 1


@contextmanager
def generation_mode(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode with, under FSDP2, the root module's own parameters gathered; then as it was.

    `generate` runs the model inside the FSDP2 root (the PEFT wrapper's transformers model), past the root's
    forward hook, so the parameters that hook would gather (embeddings, head, a vision tower's patch embedding)
    would stay sharded; the decoder layers, sharded on their own, still gather in their own hooks. The root
    learns it is the root in its first forward, and generation can come before any, so that lazy initialisation
    runs here (an FSDP2 internal, guarded). A collective under FSDP2: every rank calls it.
    """
    was_training = model.training
    model.eval()
    fsdp = fsdp2_lazy_init(model)
    if fsdp:
        model.unshard()
    try:
        yield
    finally:
        if fsdp:
            model.reshard()
        model.train(was_training)


def gathers_whole_model(accelerator, wanted: bool) -> bool:
    """Whether generation gathers the whole model first: asked for, and ZeRO-3 over several processes."""
    return wanted and zero_stage(accelerator) == 3 and accelerator.num_processes > 1


def whole_model_gathered(model: nn.Module, gather: bool):
    """With `gather`, the ZeRO-3 engine `model`'s parameters all gathered on this rank for the block, and
    DeepSpeed's per-module fetch / release hooks off (DeepSpeed's own helper, which puts them back after);
    otherwise nothing. Gathering is a collective: every rank enters together; inside, ranks run on their own."""
    if not gather:
        return nullcontext()
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    return unwrap_model_for_generation(model)
