"""The GPU probe behind `train.micro_batch_size: auto`: does a micro-batch of n of the data's longest rows train?

A few forward/backward passes of the loaded model (LoRA applied, not yet wrapped for distribution), with room held
for the optimizer's states, which AdamW allocates only at its first step. An out-of-memory is caught and the
memory freed before the next, smaller, try.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from vlmtune.config.schema import Recipe
from vlmtune.engine.loop import collate, forward, token_loss_sum, weights_dtype
from vlmtune.engine.loss import LeanLoss
from vlmtune.plan.autobatch import Probe

PASSES = 2  # the second pass meets the first's freed-but-cached blocks, as every later step does


def longest_rows(recipe: Recipe, lengths: list[int]) -> list:
    """One sampler item of the longest kind: the longest row, or (packed) a bin filled with the longest rows."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if recipe.data.batching != "packed":
        return order[:1]
    capacity, used, bin_ = recipe.data.pack_length or recipe.data.max_length, 0, []
    for i in order:
        if used + lengths[i] <= capacity:
            bin_.append(i)
            used += lengths[i]
    return [bin_]


def cuda_probe(
    recipe: Recipe,
    model: torch.nn.Module,
    data,
    collator,
    autocast: Callable[[], AbstractContextManager],
    device: torch.device,
) -> Probe:
    """probe(n): whether n copies of the data's longest item train on `device` (out-of-memory → False)."""
    item = longest_rows(recipe, data.lengths)
    dtype = weights_dtype(model)
    t = recipe.train
    lean = None if t.loss == "standard" else LeanLoss(model, t.loss, t.loss_chunk_tokens)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_of(batch: dict) -> torch.Tensor:
        with autocast():
            if lean is None:
                return token_loss_sum(forward(model, batch, dtype), batch["labels"])
            return lean(lambda **extra: forward(model, batch, dtype, **extra), batch)

    def probe(n: int) -> bool:
        ok = True
        reserve: list[torch.Tensor] = []
        try:
            reserve = [torch.zeros_like(p) for p in trainable for _ in range(2)]  # AdamW's m and v
            batch = {k: v.to(device) for k, v in collate(collator, data, item * n).items()}
            for _ in range(PASSES):
                loss_of(batch).backward()
            torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            ok = False  # the exception (and the tensors its frames hold) is dropped before freeing below
        batch = None
        reserve.clear()
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        return ok

    return probe


def min_over_ranks(device: torch.device) -> Callable[[int], int]:
    """The smallest value any process found: every rank must train with the same micro-batch."""
    import torch.distributed as dist

    def agree(n: int) -> int:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return n
        value = torch.tensor([n], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return int(value.item())

    return agree
