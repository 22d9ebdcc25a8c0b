"""Memory-lean next-token loss: the output head and cross-entropy applied chunk by chunk to trained positions.

The standard path (`vlmtune.engine.loop.token_loss_sum`) takes the model's logits, a (batch, tokens, vocab)
tensor, and upcasts it to fp32: with a 150k vocabulary that is the largest tensor of a LoRA step. Here the model
is called with `logits_to_keep=1` (every causal LM and VLM class of transformers takes it, so it computes one
position's logits), the last hidden state is taken from its backbone by a forward hook, and the head is applied
only to the positions that have a label, `chunk` rows at a time.

For a plain linear head (the usual case, also when trained through `lora.modules_to_save`), each chunk's
gradients are computed right in the forward pass and kept (trained rows × hidden, plus the head's shape when it
trains): no pass holds more than a chunk of logits, nothing is recomputed, and backward never touches the head's
weight. That is what makes the loss work under ZeRO-3 / FSDP2: the head's (frozen) weight is gathered once per
micro-batch, the same collective on every rank whatever its token count, and released before backward. A head
adapted by LoRA or quantised falls back to autograd through the module, each chunk under non-reentrant
activation checkpointing (recomputed in backward); that path needs unsharded weights.

Going through the wrapped model's own forward (not calling the backbone directly) keeps DDP, FSDP2 and DeepSpeed
hooks where they expect to be. `train.loss: liger` hands the same trained rows to Liger's fused linear
cross-entropy (Triton, GPU only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlmtune.data.encode import IGNORE_INDEX
from vlmtune.errors import UserError


def trained_rows(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states that predict a trained token, (n, hidden), and those tokens, (n,).

    Position t predicts label t + 1 (labels are aligned with the inputs, as in `token_loss_sum`).
    """
    mask = labels[:, 1:] != IGNORE_INDEX
    return hidden[:, :-1][mask], labels[:, 1:][mask]


def _capped(z: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 logits from the head's output, Gemma's tanh soft-cap applied; and tanh's value, for the gradient."""
    z = z.float()
    if softcap is None:
        return z, None
    th = torch.tanh(z / softcap)
    return th * softcap, th


def _chunk_loss(
    head: Callable[[torch.Tensor], torch.Tensor],
    h: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None,
) -> torch.Tensor:
    return F.cross_entropy(_capped(head(h), softcap)[0], targets, reduction="sum")


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


def _loss_and_grads(rows, weight, bias, targets, chunk: int, softcap: float | None, need: tuple[bool, ...]):
    """The summed loss and, where `need` asks (rows, weight, bias), its gradients, `chunk` rows at a time."""
    need_rows, need_w, need_b = need
    total = torch.zeros((), dtype=torch.float32, device=rows.device)
    g_rows = torch.empty_like(rows) if need_rows else None
    g_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    g_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
    for start in range(0, rows.shape[0], chunk):
        h, t = rows[start : start + chunk], targets[start : start + chunk]
        z = F.linear(h, weight, bias)
        logits, th = _capped(z, softcap)
        total += F.cross_entropy(logits, t, reduction="sum")
        if not any(need):
            continue
        g = torch.softmax(logits, dim=-1)  # d loss / d logits = softmax - one-hot
        g[torch.arange(len(t), device=g.device), t] -= 1
        if th is not None:
            g *= 1 - th * th
        g = g.to(z.dtype)  # as autograd would hand it back through `.float()`
        if need_rows:
            g_rows[start : start + chunk] = g @ weight.to(g.dtype)
        if need_w:
            g_w += (g.t() @ h.to(g.dtype)).float()
        if need_b:
            g_b += g.sum(0).float()
    return total, g_rows, g_w, g_b


class _LinearCrossEntropy(torch.autograd.Function):
    """`_loss_and_grads` as an autograd function: backward only scales the gradients forward computed."""

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, chunk: int, softcap: float | None):
        total, g_rows, g_w, g_b = _loss_and_grads(
            rows, weight, bias, targets, chunk, softcap, ctx.needs_input_grad[:3]
        )
        ctx.save_for_backward(
            g_rows,
            None if g_w is None else g_w.to(weight.dtype),
            None if g_b is None else g_b.to(bias.dtype),
        )
        return total

    @staticmethod
    def backward(ctx, grad_out):
        g_rows, g_w, g_b = ctx.saved_tensors
        scale = [None if g is None else g * grad_out.to(g.dtype) for g in (g_rows, g_w, g_b)]
        return *scale, None, None, None


def linear_cross_entropy_sum(
    rows: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    chunk: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of the linear head `(weight, bias)` on `rows`, never holding more than `chunk` rows
    of logits; backward only scales gradients computed here, so it needs neither the weight nor a recompute."""
    tensors = (rows, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _LinearCrossEntropy.apply(rows, weight, bias, targets, chunk, softcap)
    return _loss_and_grads(rows, weight, bias, targets, chunk, softcap, (False, False, False))[0]


def plain_linear(head: nn.Module) -> nn.Linear | None:
    """The `nn.Linear` that `head` applies, also through PEFT's `modules_to_save` wrapper or FSDP2's dynamic
    subclass (hooks, same forward); None for a head that LoRA adapts or that is quantised (its own forward)."""
    if isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward:
        return head
    copies = getattr(head, "modules_to_save", None)
    if not isinstance(copies, nn.ModuleDict):
        return None
    active = head.active_adapters
    if head.disable_adapters or any(a not in copies for a in active):
        return plain_linear(head.original_module)
    return plain_linear(copies[active[0]]) if len(active) == 1 else None


def is_sharded(p: torch.Tensor) -> bool:
    """Partitioned by ZeRO-3 (`ds_id`) or sharded by FSDP2 (a DTensor)."""
    from torch.distributed.tensor import DTensor

    return hasattr(p, "ds_id") or isinstance(p, DTensor)


@contextmanager
def full_weights(linear: nn.Linear, dtype: torch.dtype) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """The head's whole weight and bias. Under ZeRO-3 / FSDP2 (frozen head) they are gathered, in `dtype` as the
    sharding's own unshard would cast them: a collective that every rank runs once per micro-batch, whatever its
    token count, and released on exit."""
    params = [p for p in (linear.weight, linear.bias) if p is not None]
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield tuple(None if p is None else p.detach().to(dtype) for p in (linear.weight, linear.bias))
        return
    if any(is_sharded(p) for p in params):
        yield tuple(
            None if p is None else p.detach().full_tensor().to(dtype) for p in (linear.weight, linear.bias)
        )
        return
    yield linear.weight, linear.bias


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / DeepSpeed (`.module`) and PEFT wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The transformers model's backbone (whose first output is the last hidden state) and output head, or None
    for a model without them as separate modules."""
    hf = unwrap(model)
    backbone = getattr(hf, "base_model", hf)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    return None if backbone is hf or head is None else (backbone, head)


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
        hf, parts = unwrap(model), backbone_and_head(model)
        if parts is None:
            raise UserError(
                f"train.loss: {kind} needs a model with a backbone and an output head; "
                f"{type(hf).__name__} has none; use train.loss: standard"
            )
        backbone, head = parts
        self.kind, self.chunk, self.head = kind, chunk, head
        self.linear = plain_linear(head)
        self.softcap = final_logit_softcap(hf)
        sharded = any(is_sharded(p) for p in head.parameters())
        if sharded and (self.linear is None or any(p.requires_grad for p in self.linear.parameters())):
            raise UserError(
                f"train.loss: {kind} under ZeRO-3 / FSDP2 needs a frozen, plain linear output head, and this "
                f"{type(head).__name__} is {'trained' if self.linear is not None else 'adapted or quantised'}; "
                "keep lm_head out of lora.target_modules / lora.modules_to_save, or use train.loss: standard"
            )
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
        rows, targets = trained_rows(hidden, batch["labels"])
        if self._liger is not None:
            self._check(hidden, last_logits, self.head)
            return self._liger(self.head.weight, rows.to(self.head.weight.dtype), targets, self.head.bias)
        if self.linear is None:
            self._check(hidden, last_logits, self.head)
            return chunked_cross_entropy_sum(rows, targets, self.head, self.chunk, self.softcap)
        with full_weights(self.linear, rows.dtype) as (weight, bias):
            self._check(hidden, last_logits, lambda h: F.linear(h, weight, bias))
            return linear_cross_entropy_sum(rows, targets, weight, bias, self.chunk, self.softcap)

    @torch.no_grad()
    def _check(self, hidden: torch.Tensor, last_logits: torch.Tensor, head: Callable) -> None:
        """Once: refuse a model whose forward does more after the head than this module knows (a logit scale...):
        the one position the model computed must equal the head applied here to the same hidden state."""
        if self._checked:
            return
        ours, _ = _capped(head(hidden[:, -1:]), self.softcap)
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
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum", softcap=softcap)
