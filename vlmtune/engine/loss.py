"""Memory-lean next-token loss: the output head and cross-entropy applied chunk by chunk to trained positions.

The standard path (`vlmtune.engine.loop.token_loss_sum`) takes the model's logits, a (batch, tokens, vocab)
tensor, and upcasts it to fp32: with a 150k vocabulary that is the largest tensor of a LoRA step. Here the model
is called with `logits_to_keep=1` (every causal LM and VLM class of transformers takes it, so it computes one
position's logits), the last hidden state is taken from its backbone by a forward hook, and the head is applied
only to the positions that have a label, `chunk` rows at a time. Each chunk runs under non-reentrant activation
checkpointing, so backward recomputes its logits instead of keeping them: peak memory is O(chunk × vocab).

Going through the wrapped model's own forward (not calling the backbone directly) keeps DDP, FSDP2 and DeepSpeed
hooks where they expect to be. `train.loss: liger` hands the same trained rows to Liger's fused linear
cross-entropy (Triton, GPU only).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlmtune.errors import UserError

IGNORE = -100


def trained_rows(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states that predict a trained token, (n, hidden), and those tokens, (n,).

    Position t predicts label t + 1 (labels are aligned with the inputs, as in `token_loss_sum`).
    """
    mask = labels[:, 1:] != IGNORE
    return hidden[:, :-1][mask], labels[:, 1:][mask]


def _chunk_loss(
    head: Callable[[torch.Tensor], torch.Tensor],
    h: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None,
) -> torch.Tensor:
    logits = head(h).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_cross_entropy_sum(
    rows: torch.Tensor,
    targets: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    chunk: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of `head(rows)` against `targets`, never holding more than `chunk` rows of logits.

    With gradients enabled each chunk is checkpointed: its logits are freed after the forward and recomputed,
    one chunk at a time, in backward.
    """
    if rows.shape[0] == 0:
        # Keep a graph to every weight that made `rows`, so backward (and DDP's reducer) still runs.
        return rows.sum().float() * 0.0
    total = None
    for start in range(0, rows.shape[0], chunk):
        h, t = rows[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled():
            part = checkpoint(_chunk_loss, head, h, t, softcap, use_reentrant=False)
        else:
            part = _chunk_loss(head, h, t, softcap)
        total = part if total is None else total + part
    return total


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / DeepSpeed (`.module`) and PEFT wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def final_logit_softcap(model: nn.Module) -> float | None:
    """Gemma 2/3's tanh soft-capping of the logits (applied after the head), if the config sets it."""
    config = model.config
    for cfg in (config, getattr(config, "text_config", None)):
        cap = getattr(cfg, "final_logit_softcapping", None) if cfg is not None else None
        if cap:
            return float(cap)
    return None


class LeanLoss:
    """Summed next-token cross-entropy over trained positions without full-vocabulary logits.

    Args:
        model: The model as the loop calls it (possibly wrapped by DDP / DeepSpeed / PEFT).
        kind: `chunked` (PyTorch, any device) or `liger` (Liger's fused kernel, CUDA only).
        chunk: Trained tokens per chunk of logits.

    Raises:
        UserError: the model has no separate backbone / head, or `liger` cannot run here.
    """

    def __init__(self, model: nn.Module, kind: str, chunk: int) -> None:
        hf = unwrap(model)
        backbone = getattr(hf, "base_model", hf)
        head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
        if backbone is hf or head is None:
            raise UserError(
                f"train.loss: {kind} needs a model with a backbone and an output head; "
                f"{type(hf).__name__} has none; use train.loss: standard"
            )
        self.kind, self.chunk, self.head = kind, chunk, head
        self.softcap = final_logit_softcap(hf)
        self._hidden: torch.Tensor | None = None
        self._checked = False
        backbone.register_forward_hook(self._keep_hidden)
        self._liger = _liger_loss(head, self.softcap) if kind == "liger" else None

    def _keep_hidden(self, module: nn.Module, args, output) -> None:
        self._hidden = output[0]  # last_hidden_state: the first field of the backbone's output

    def __call__(
        self, model_forward: Callable[..., torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The summed loss of `batch`; `model_forward(**extra)` runs the model and returns its logits."""
        self._hidden = None
        last_logits = model_forward(logits_to_keep=1)
        hidden, self._hidden = self._hidden, None
        if hidden is None:
            raise UserError(
                f"train.loss: {self.kind}: the model's backbone did not run through its forward; "
                "use train.loss: standard"
            )
        if not self._checked:
            self._check_head(hidden, last_logits)
        rows, targets = trained_rows(hidden, batch["labels"])
        if self._liger is not None:
            return self._liger(self.head.weight, rows.to(self.head.weight.dtype), targets, self.head.bias)
        return chunked_cross_entropy_sum(rows, targets, self.head, self.chunk, self.softcap)

    @torch.no_grad()
    def _check_head(self, hidden: torch.Tensor, last_logits: torch.Tensor) -> None:
        """Refuse a model whose forward does more after the head than this module knows (a logit scale...):
        the one position the model computed must equal the head applied here to the same hidden state."""
        ours = self.head(hidden[:, -1:]).float()
        if self.softcap is not None:
            ours = torch.tanh(ours / self.softcap) * self.softcap
        theirs = last_logits[:, -1:].float()
        tol = 1e-3 * max(float(theirs.abs().max()), 1.0)
        if ours.shape != theirs.shape or float((ours - theirs).abs().max()) > tol:
            raise UserError(
                f"train.loss: {self.kind}: this model transforms its logits after the output head in a way "
                "vlmtune does not reproduce (its logits differ from head(hidden state)); use train.loss: standard"
            )
        self._checked = True


def _liger_loss(head: nn.Module, softcap: float | None) -> Callable:
    if not torch.cuda.is_available():
        raise UserError("train.loss: liger runs Triton kernels and needs a CUDA GPU; use train.loss: chunked")
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        raise UserError(
            "train.loss: liger needs the liger-kernel package (pip install 'vlmtune[liger]'); "
            "or use train.loss: chunked"
        ) from None
    if type(head) is not nn.Linear or head.weight.numel() == 0:
        raise UserError(
            f"train.loss: liger needs a plain, unsharded linear output head, and this one is "
            f"{type(head).__name__} (adapted by LoRA, quantised or partitioned by ZeRO-3); use train.loss: chunked"
        )
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum", softcap=softcap)
