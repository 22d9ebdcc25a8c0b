"""Per-token log-probabilities of a padded batch's trained tokens: what DPO and GRPO score sequences with.

One forward of the batch (every collated input, a VLM's vision inputs too, through `engine.loop.forward`), then
for each position whose next token has a label, the log-probability the model gives that token. Labels are
aligned with the inputs as everywhere in the loop: position t predicts label t + 1, so the result has one column
fewer than the batch and `mask = labels[:, 1:] != IGNORE_INDEX`.

Memory: the model's logits (batch × length × vocab, in its dtype) exist anyway; what this module avoids is a
float32 log-softmax of all of them held for backward. Only the rows that predict a trained token are taken, and
they are scored `chunk` rows at a time under activation checkpointing, so no more than one chunk of float32
logits lives at once, in the forward and again in backward.

The reference model of DPO and GRPO's KL term is the same model with its adapter switched off
(`reference_logps`): no second copy in memory, and every rank runs it, so it works under DDP, ZeRO-3 and FSDP2,
whose parameter gathering happens inside the forward that all ranks make together.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlmtune.data.encode import IGNORE_INDEX
from vlmtune.engine.distributed import fsdp2_lazy_init
from vlmtune.engine.loop import forward

# Rows of float32 logits scored at once (with a 150k vocabulary: 600 MB per 1,024 rows).
CHUNK_ROWS = 1024


def _token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(target) of each row of `logits` (n, vocab), in float32."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    return z.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)


def logps_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, chunk: int = CHUNK_ROWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of `labels` under `logits`, (N, T - 1) float32, and their mask.

    Args:
        logits: (N, T, vocab) logits of a batch, any dtype.
        labels: (N, T) labels aligned with the inputs; IGNORE_INDEX where a token is not scored.
        temperature: Divides the logits first (GRPO scores completions at the sampling temperature).
        chunk: Rows of logits turned into float32 at once.

    Returns:
        `(per_token_logps, mask)`: column t is the log-probability of token t + 1 given tokens ≤ t, 0 where the
        mask is False.
    """
    mask = labels[:, 1:] != IGNORE_INDEX
    rows = logits[:, :-1][mask]  # (n, vocab): only the positions that predict a scored token
    targets = labels[:, 1:][mask]
    parts = []
    for start in range(0, rows.shape[0], chunk):
        args = (rows[start : start + chunk], targets[start : start + chunk], temperature)
        if torch.is_grad_enabled() and rows.requires_grad:
            # Recompute the chunk's float32 log-softmax in backward instead of keeping it.
            parts.append(checkpoint(_token_logps, *args, use_reentrant=False))
        else:
            parts.append(_token_logps(*args))
    # No scored token (a placeholder batch): an empty slice of the logits keeps the result in the graph, so the
    # backward that every rank must run (DDP, ZeRO-3) still reaches the model, with zero gradients.
    values = torch.cat(parts) if parts else rows[:, 0].float()
    per_token = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    return per_token.masked_scatter(mask, values), mask


def completion_logps(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    dtype: torch.dtype | None = None,
    *,
    exclude: Collection[str] = (),
    temperature: float = 1.0,
    chunk: int = CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the trained tokens of `batch` from one forward of `model`.

    Args:
        model: The model as the loop calls it (wrapped by DDP / DeepSpeed / FSDP, or not).
        batch: A padded batch: `input_ids`, `attention_mask`, `labels` (IGNORE_INDEX on prompt, images and
            padding) and any vision inputs.
        dtype: The model's weights dtype, for floating inputs (pixel values); see `engine.loop.forward`.
        exclude: Batch entries that are not model inputs (a method's own tensors, such as `pairs`).
        temperature: Divides the logits before the softmax.
        chunk: Rows of logits turned into float32 at once.

    Returns:
        `(per_token_logps, mask)`, both (N, T - 1): see `logps_from_logits`.
    """
    inputs = {k: v for k, v in batch.items() if k not in exclude}
    logits = forward(model, inputs, dtype, use_cache=False)
    return logps_from_logits(logits, batch["labels"], temperature=temperature, chunk=chunk)


def peft_model(model: nn.Module) -> nn.Module:
    """The PEFT model inside DDP / DeepSpeed wrappers (`.module`), which can switch its adapter off."""
    while isinstance(getattr(model, "module", None), nn.Module) and not hasattr(model, "disable_adapter"):
        model = model.module
    return model


@contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """The base model for the duration: the reference policy of DPO and of GRPO's KL term."""
    inner = peft_model(model)
    if not hasattr(inner, "disable_adapter"):
        raise TypeError(
            f"{type(inner).__name__} has no adapter to disable: the reference pass needs a PEFT (LoRA) model"
        )
    fsdp2_lazy_init(inner)  # while the adapter still requires grad (see there)
    with inner.disable_adapter():
        yield


@torch.no_grad()
def reference_logps(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    dtype: torch.dtype | None = None,
    *,
    exclude: Collection[str] = (),
    temperature: float = 1.0,
    chunk: int = CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`completion_logps` of the base model: the same model with its adapter off, without gradients.

    Called through the wrapped model, so DeepSpeed / FSDP gather the (frozen) parameters as in any forward:
    every rank must call it the same number of times.
    """
    with adapter_disabled(model):
        return completion_logps(model, batch, dtype, exclude=exclude, temperature=temperature, chunk=chunk)
