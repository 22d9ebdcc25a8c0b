"""method: distill, knowledge distillation from a frozen teacher that shares the student's vocabulary.

The loss of a micro-batch is `alpha × KD + (1 − alpha) × CE`, both summed over trained tokens (weight: trained
tokens, as for sft). KD compares the teacher's and the student's next-token distributions at temperature T
(forward KL(teacher‖student), reverse KL(student‖teacher) or the Jensen-Shannon divergence) and is scaled by T²
so its gradients keep their size as T changes; CE is the labels' cross-entropy at temperature 1.

Memory follows `train.loss: chunked` (`engine/loss.py`): both models run with `logits_to_keep=1`, their last
hidden states are taken by forward hooks, and the two output heads are applied to the trained positions only,
`train.loss_chunk_tokens` rows at a time. Each chunk's gradients are computed right there (autograd on the chunk,
inside an autograd function), so no pass holds more than one chunk of each vocabulary-wide tensor and backward
needs neither head. Under ZeRO-3 / FSDP2 each (frozen) head is gathered once per micro-batch, the same
collective on every rank whatever its token count.

The teacher is loaded like the student (`model.load.load_model`: its own dtype, `quant` allowed), frozen, in eval
mode, and sharded like the student: a DeepSpeed inference engine under ZeRO-3, `fully_shard` under FSDP2, a plain
replica otherwise. A vision-language teacher (same family as the student) gets the same vision inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmtune.config.schema import DistillConfig
from vlmtune.engine.loop import forward, trained_tokens, weights_dtype
from vlmtune.engine.loss import (
    backbone_and_head,
    final_logit_softcap,
    full_weights,
    is_sharded,
    plain_linear,
    trained_rows,
    unwrap,
)
from vlmtune.engine.method import Batch
from vlmtune.errors import UserError

Logits = Callable[[torch.Tensor], torch.Tensor]  # hidden rows (n, hidden) → fp32 logits (n, vocab)


# --- the divergences -----------------------------------------------------------------------------------------


def kd_sum(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    """Summed divergence between the teacher's and the student's distributions of each row, times T².

    Args:
        student: Student logits (rows, vocab), fp32.
        teacher: Teacher logits (rows, vocab), fp32, no gradient needed.
        kind: forward_kl (KL(teacher‖student), mass-covering), reverse_kl (KL(student‖teacher), mode-seeking) or
            jsd (Jensen-Shannon, each distribution against their mean, weight 1/2).
        temperature: T: both distributions are softmax(logits / T).
    """
    s = F.log_softmax(student / temperature, dim=-1)
    t = F.log_softmax(teacher / temperature, dim=-1)
    if kind == "forward_kl":
        div = _kl(t, s)
    elif kind == "reverse_kl":
        div = _kl(s, t)
    elif kind == "jsd":
        mean = torch.logsumexp(torch.stack([s, t]), dim=0) - math.log(2.0)
        div = 0.5 * (_kl(t, mean) + _kl(s, mean))
    else:
        raise ValueError(f"unknown distillation loss {kind!r}")
    return div * (temperature * temperature)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q) over all rows; a token the first distribution gives no mass adds nothing."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum()


@dataclass(frozen=True)
class Spec:
    """How a chunk's loss is made: the two heads (hidden rows → fp32 logits) and the recipe's settings."""

    student: Logits
    teacher: Logits
    kind: str
    temperature: float
    alpha: float
    chunk: int
    vocab: int | None = None  # compare the first `vocab` logits only (heads padded to different sizes)


def _chunk_sums(spec: Spec, h: torch.Tensor, th: torch.Tensor, targets: torch.Tensor):
    """(loss, kd, ce) of one chunk; the loss has a graph to `h` (and the student head) when grad is enabled."""
    z = spec.student(h)
    with torch.no_grad():
        zt = spec.teacher(th)
    if spec.vocab is not None:
        z, zt = z[:, : spec.vocab], zt[:, : spec.vocab]
    kd = kd_sum(z, zt, spec.kind, spec.temperature)
    ce = F.cross_entropy(z, targets, reduction="sum")
    return spec.alpha * kd + (1.0 - spec.alpha) * ce, kd.detach(), ce.detach()


def _sums_and_grads(
    spec: Spec, rows, t_rows, targets, params: tuple[torch.Tensor, ...], need: tuple[bool, ...]
):
    """Summed (loss, kd, ce) over every chunk and, where `need` says (rows, *params), the loss's gradients."""
    sums = torch.zeros(3, dtype=torch.float32, device=rows.device)
    g_rows = torch.zeros_like(rows) if need[0] else None
    g_params = [torch.zeros_like(p) if n else None for p, n in zip(params, need[1:], strict=True)]
    wanted = [p for p, n in zip(params, need[1:], strict=True) if n]
    for start in range(0, rows.shape[0], spec.chunk):
        part = slice(start, start + spec.chunk)
        with torch.set_grad_enabled(any(need)):
            h = rows[part].detach().requires_grad_(need[0])
            loss, kd, ce = _chunk_sums(spec, h, t_rows[part], targets[part])
            inputs = ([h] if need[0] else []) + wanted
            grads = list(torch.autograd.grad(loss, inputs)) if inputs else []
        sums += torch.stack([loss.detach(), kd, ce])
        if need[0]:
            g_rows[part] = grads.pop(0)
        for i, n in enumerate(need[1:]):
            if n:
                g_params[i] += grads.pop(0)
    return sums, g_rows, g_params


class _ChunkedDistill(torch.autograd.Function):
    """`_sums_and_grads` as an autograd function: backward only scales the gradients the forward computed.

    `params` are the trainable tensors `spec.student` reads (a trained head's weights), so their gradients reach
    them (and DDP's reducer) through this node; a frozen head passes none.
    """

    @staticmethod
    def forward(ctx, spec: Spec, rows, t_rows, targets, *params):
        sums, g_rows, g_params = _sums_and_grads(
            spec, rows, t_rows, targets, params, (ctx.needs_input_grad[1], *ctx.needs_input_grad[4:])
        )
        ctx.save_for_backward(g_rows, *g_params)
        loss, kd, ce = sums.unbind()
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _kd, _ce):
        g_rows, *g_params = ctx.saved_tensors
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in (g_rows, *g_params)]
        return None, scaled[0], None, None, *scaled[1:]


def distill_sums(
    spec: Spec,
    rows: torch.Tensor,
    t_rows: torch.Tensor,
    targets: torch.Tensor,
    params: tuple[torch.Tensor, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed `alpha × KD + (1 − alpha) × CE` over the trained rows (with its graph), and the kd and ce sums.

    Args:
        spec: The heads and settings.
        rows: Student hidden states of the trained positions, (n, hidden).
        t_rows: Teacher hidden states of the same positions, (n, teacher hidden).
        targets: The trained tokens, (n,).
        params: Trainable tensors that `spec.student` reads (empty for a frozen head).
    """
    if rows.shape[0] == 0:
        # Keep a graph to every weight that made `rows`, so backward (and DDP's reducer) still runs.
        zero = rows.sum().float() * 0.0
        return zero, zero.detach(), zero.detach()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (rows, *params)):
        return _ChunkedDistill.apply(spec, rows, t_rows, targets, *params)
    sums, _, _ = _sums_and_grads(spec, rows, t_rows, targets, params, (False,) * (1 + len(params)))
    return tuple(sums.unbind())


# --- one model's last hidden state and head --------------------------------------------------------------------


class HeadOf:
    """A model's last hidden state (kept by a forward hook on its backbone) and its output head as `Logits`.

    Raises:
        UserError: the model has no separate backbone and head, or its head is sharded and not a frozen linear.
    """

    def __init__(self, model: nn.Module, role: str) -> None:
        hf, parts = unwrap(model), backbone_and_head(model)
        if parts is None:
            raise UserError(
                f"method: distill needs the {role} to have a backbone and an output head; "
                f"{type(hf).__name__} has none"
            )
        backbone, head = parts
        self.role, self.head, self.linear = role, head, plain_linear(head)
        self.softcap = final_logit_softcap(hf)
        self.out_features = _full_rows(head)
        sharded = any(is_sharded(p) for p in head.parameters())
        if sharded and (self.linear is None or any(p.requires_grad for p in head.parameters())):
            raise UserError(
                f"method: distill under ZeRO-3 / FSDP2 needs the {role}'s output head frozen and plain linear; "
                "keep lm_head out of lora.target_modules / lora.modules_to_save"
            )
        self.hidden: torch.Tensor | None = None
        self._checked = False
        backbone.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args, output) -> None:
        self.hidden = output[0]  # last_hidden_state: the first field of the backbone's output

    def take(self) -> torch.Tensor:
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            raise UserError(f"method: distill: the {self.role}'s backbone did not run through its forward")
        return hidden

    def trainable(self) -> tuple[torch.Tensor, ...]:
        """The head's trainable tensors, when it is called as a module (a trained or adapted head)."""
        return tuple(p for p in self.head.parameters() if p.requires_grad)

    @contextmanager
    def logits(self, dtype: torch.dtype) -> Iterator[tuple[Logits, tuple[torch.Tensor, ...]]]:
        """(rows → fp32 logits, the trainable tensors it reads). A frozen linear head is gathered once (ZeRO-3 /
        FSDP2) and applied as `F.linear`; any other head is called as a module."""
        if self.linear is not None and not self.trainable():
            with full_weights(self.linear, dtype) as (weight, bias):
                yield (lambda h: _capped(F.linear(h.to(weight.dtype), weight, bias), self.softcap)), ()
            return
        yield (lambda h: _capped(self.head(h), self.softcap)), self.trainable()

    @torch.no_grad()
    def check(self, hidden: torch.Tensor, last_logits: torch.Tensor, logits: Logits) -> None:
        """Once: refuse a model whose forward does more after the head than this module knows (a logit scale...):
        the one position the model computed must equal the head applied here to the same hidden state."""
        if self._checked:
            return
        ours = logits(hidden[:, -1])
        theirs = last_logits[:, -1].float()
        tol = 1e-3 * max(float(theirs.abs().max()), 1.0)
        if ours.shape != theirs.shape or float((ours - theirs).abs().max()) > tol:
            raise UserError(
                f"method: distill: the {self.role} transforms its logits after the output head in a way vlmtune "
                "does not reproduce (its logits differ from head(hidden state))"
            )
        self._checked = True


def _capped(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    z = z.float()
    return z if softcap is None else torch.tanh(z / softcap) * softcap


def _full_rows(head: nn.Module) -> int:
    """The head's vocabulary rows, also when sharded (ZeRO-3 keeps the full shape in `ds_shape`)."""
    w = head.weight
    shape = getattr(w, "ds_shape", None) or tuple(w.shape)
    return int(shape[0])


# --- the method ------------------------------------------------------------------------------------------------


class Distill:
    """method: distill (`engine.method.Method`): KD from a frozen teacher plus the labels' cross-entropy.

    Args:
        accelerator: The run's accelerator (autocast, strategy).
        model: The student as prepared by the accelerator.
        teacher: The teacher, already frozen and prepared by `prepare_teacher`.
        cfg: The recipe's `distill:` section.
        chunk: Trained tokens per chunk of logits (`train.loss_chunk_tokens`).
        vocab: The shared tokenizer's length (both heads may be padded beyond it).
    """

    metric_names: tuple[str, ...] = ("kd_loss", "ce_loss")

    def __init__(self, accelerator, model, teacher, cfg: DistillConfig, *, chunk: int, vocab: int) -> None:
        self.acc, self.model, self.teacher, self.cfg, self.chunk = accelerator, model, teacher, cfg, chunk
        self.student_head, self.teacher_head = HeadOf(model, "student"), HeadOf(teacher, "teacher")
        for head in (self.student_head, self.teacher_head):
            if head.out_features < vocab:
                raise UserError(
                    f"method: distill: the {head.role}'s output head has {head.out_features} rows, fewer than "
                    f"the tokenizer's {vocab} tokens"
                )
        sizes = {self.student_head.out_features, self.teacher_head.out_features}
        self.vocab = None if len(sizes) == 1 else vocab  # padded differently: compare the real tokens only
        self.dtype, self.teacher_dtype = weights_dtype(model), weights_dtype(teacher)

    def prepare(self, step: int, micro_batches: list[Batch], *, training: bool) -> list[Batch]:
        return micro_batches

    def weight(self, batch: Batch) -> int:
        return trained_tokens(batch["labels"])

    def loss_sum(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.student_head, self.teacher_head
        with torch.no_grad():
            t_last = forward(self.teacher, batch, self.teacher_dtype, logits_to_keep=1)
        t_hidden = t.take()
        s_last = forward(self.model, batch, self.dtype, logits_to_keep=1)
        s_hidden = s.take()
        rows, targets = trained_rows(s_hidden, batch["labels"])
        t_rows, _ = trained_rows(t_hidden, batch["labels"])
        # The heads run outside the models' forwards, which accelerate wraps in autocast: wrap them the same way.
        with ExitStack() as stack:
            stack.enter_context(self.acc.autocast())
            s_logits, params = stack.enter_context(s.logits(rows.dtype))
            t_logits, _ = stack.enter_context(t.logits(t_rows.dtype))
            s.check(s_hidden, s_last, s_logits)
            t.check(t_hidden, t_last, t_logits)
            c = self.cfg
            spec = Spec(s_logits, t_logits, c.loss, c.temperature, c.alpha, self.chunk, self.vocab)
            loss, kd, ce = distill_sums(spec, rows, t_rows, targets, params)
        return loss, torch.stack([kd, ce]).detach()

    def summarise(
        self, loss: float, sums: dict[str, float], weight: float, *, eval: bool
    ) -> dict[str, float]:
        per = max(weight, 1.0)
        return {"kd_loss": sums["kd_loss"] / per, "ce_loss": sums["ce_loss"] / per}

    def state_dict(self) -> dict[str, Any]:
        return {}  # the teacher is frozen and deterministic: nothing to resume

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# --- building it ----------------------------------------------------------------------------------------------


def build(ctx) -> Distill:
    """The distill method of a `methods.MethodContext`: its teacher loaded, checked and prepared."""
    from vlmtune.methods.teacher import load_teacher

    tokenizer = getattr(ctx.processor, "tokenizer", ctx.processor)
    return Distill(
        ctx.accelerator, ctx.model, load_teacher(ctx), ctx.recipe.distill,
        chunk=ctx.recipe.train.loss_chunk_tokens, vocab=len(tokenizer),
    )  # fmt: skip
