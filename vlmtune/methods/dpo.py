"""method: dpo, direct preference optimisation against the adapter-disabled base model.

A micro-batch is `data.collate.PairCollator`'s: B pairs as one padded batch of 2B rows, rows [0, B) the chosen
completions and rows [B, 2B) the rejected ones (same prompt, same images), with `pairs` = B. Labels mark the
completion tokens only, so a sequence's log-probability is the sum over its completion: prompt and image tokens
never count.

`prepare` adds the reference log-probabilities (`ref_logps`, one per row) from the same model with its adapter
off, without gradients (skipped for `simpo`, which has no reference); `loss_sum` then runs chosen and rejected
through the policy in one forward. The loop divides the summed loss by the window's pairs on every rank, so the
update is the mean over pairs however the window is split.

Losses, with per-sequence log-ratios `c = log pi(chosen) - log ref(chosen)` and `r` likewise for rejected:

- `sigmoid` (DPO): `-(1 - e) log s(beta (c - r)) - e log s(-beta (c - r))`, `e` the label smoothing
  (conservative DPO; 0 is the DPO paper's loss);
- `ipo`: `(c / |chosen| - r / |rejected| - 1 / (2 beta))^2`, the log-ratios averaged over completion tokens
  (as TRL does, so beta means the same for short and long completions); label smoothing does not apply;
- `simpo` (reference-free): as `sigmoid` on the length-averaged log-probabilities minus the margin
  `gamma / beta`.

Metrics (means over pairs): `rewards/chosen` and `rewards/rejected` (beta times the log-ratio, or for simpo
beta times the length-averaged log-probability), `rewards/margin` (their difference) and `rewards/accuracy`
(the share of pairs whose chosen reward is the higher); evaluation logs them as `eval_rewards/...`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vlmtune.config.schema import DpoConfig
from vlmtune.engine.loop import weights_dtype
from vlmtune.engine.method import Batch
from vlmtune.methods.logps import completion_logps, reference_logps

# Batch entries that are not model inputs: the pair count and the reference log-probabilities added here.
_NOT_INPUTS = ("pairs", "ref_logps")


def preference_loss(
    config: DpoConfig,
    logps: torch.Tensor,
    lengths: torch.Tensor,
    ref_logps: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and rewards from per-sequence log-probabilities.

    Args:
        config: The recipe's `dpo:` section (beta, loss, gamma, label_smoothing).
        logps: (2B,) the policy's summed completion log-probabilities, chosen rows first, then rejected.
        lengths: (2B,) completion tokens of each row.
        ref_logps: (2B,) the reference's summed log-probabilities; None for simpo.

    Returns:
        `(losses, chosen_rewards, rejected_rewards)`, each (B,); the rewards are detached.
    """
    beta, smoothing = config.beta, config.label_smoothing
    lengths = lengths.clamp(min=1).to(logps.dtype)  # a row truncated to no completion scores 0, not NaN
    if config.loss == "simpo":
        scores = logps / lengths
        chosen, rejected = scores.chunk(2)
        logits = chosen - rejected - config.gamma / beta
        losses = -(1 - smoothing) * F.logsigmoid(beta * logits) - smoothing * F.logsigmoid(-beta * logits)
    else:
        if ref_logps is None:
            raise ValueError(f"dpo loss {config.loss} needs the reference log-probabilities (ref_logps)")
        ratios = logps - ref_logps.to(logps)
        chosen, rejected = ratios.chunk(2)
        if config.loss == "ipo":
            len_chosen, len_rejected = lengths.chunk(2)
            delta = chosen / len_chosen - rejected / len_rejected
            losses = (delta - 1 / (2 * beta)) ** 2
        else:
            logits = chosen - rejected
            losses = -(1 - smoothing) * F.logsigmoid(beta * logits) - smoothing * F.logsigmoid(-beta * logits)
    return losses, beta * chosen.detach(), beta * rejected.detach()


class Dpo:
    """method: dpo (`engine.method.Method`): sigmoid, ipo or simpo preference losses, normalised by pairs."""

    metric_names: tuple[str, ...] = (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margin",
        "rewards/accuracy",
    )

    def __init__(self, config: DpoConfig, model: torch.nn.Module, device: torch.device) -> None:
        """
        Args:
            config: The recipe's `dpo:` section.
            model: The prepared model (DDP / DeepSpeed / FSDP wrapped, or not) with a PEFT adapter.
            device: Where the reference pass runs (the accelerator's device).
        """
        self.config, self.model, self.device = config, model, device
        self._dtype = weights_dtype(model)

    def prepare(self, step: int, micro_batches: list[Batch], *, training: bool) -> list[Batch]:
        """Add each row's reference log-probability (`ref_logps`, on the device); simpo needs none.

        Every rank calls this with the same number of micro-batches (the loop guarantees it, in training and
        evaluation), so sharded models gather their parameters in step.
        """
        if self.config.loss == "simpo":
            return micro_batches
        out = []
        for batch in micro_batches:
            on_device = {k: v.to(self.device) for k, v in batch.items() if k not in _NOT_INPUTS}
            per_token, _ = reference_logps(self.model, on_device, self._dtype)
            # The host tensors stay as they are: the loop counts `pairs` and tokens before moving them.
            out.append({**batch, "ref_logps": per_token.sum(-1)})
        return out

    def weight(self, batch: Batch) -> int:
        return int(batch["pairs"])

    def loss_sum(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed loss of the batch's pairs from one forward of chosen and rejected rows together."""
        per_token, mask = completion_logps(self.model, batch, self._dtype, exclude=_NOT_INPUTS)
        losses, chosen, rejected = preference_loss(
            self.config, per_token.sum(-1), mask.sum(-1), batch.get("ref_logps")
        )
        # A micro-batch whose pairs were all bad rows is one placeholder pair with `pairs` 0: it runs its forward
        # (sharded models gather in step) but counts for nothing. Compared on the device: no host sync.
        real = (torch.arange(len(losses), device=losses.device) < batch["pairs"].to(losses.device)).float()
        margin = chosen - rejected
        sums = torch.stack(
            [
                (chosen * real).sum(),
                (rejected * real).sum(),
                (margin * real).sum(),
                ((margin > 0) * real).sum(),
            ]
        )
        return (losses * real).sum(), sums

    def summarise(
        self, loss: float, sums: dict[str, float], weight: float, *, eval: bool
    ) -> dict[str, float]:
        """Means over the window's (or the eval set's) pairs."""
        return {name: value / max(weight, 1.0) for name, value in sums.items()}

    def state_dict(self) -> dict[str, Any]:
        return {}  # nothing beyond the model: the reference is the model itself, with its adapter off

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
