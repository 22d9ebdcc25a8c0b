"""GRPO's arithmetic: group-normalised advantages, the clipped surrogate with its KL term, and how token losses
are normalised per loss type. Pure tensor functions, checked against hand computations and TRL's GRPOTrainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Added to the group's reward standard deviation before dividing (as TRL does): a group whose rewards are all
# equal gets advantage 0, not 0/0.
STD_EPS = 1e-4


@dataclass(frozen=True)
class LossSpec:
    """The surrogate's settings (from `GrpoConfig`)."""

    loss: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    max_completion_length: int = 256


def group_advantages(rewards: torch.Tensor, group: int, *, scale: bool) -> torch.Tensor:
    """Each reward minus its group's mean, over the group's standard deviation when `scale`.

    Args:
        rewards: (n,) prompt-major: rows [i * group, (i + 1) * group) are one prompt's completions. NaN (no reward
            could score it) is left out of the group's statistics and gets advantage 0.
        group: Completions per prompt.
        scale: Divide by the group's (Bessel-corrected) standard deviation + STD_EPS (off: Dr. GRPO).
    """
    grouped = rewards.view(-1, group).double()
    centred = grouped - grouped.nanmean(dim=1, keepdim=True)
    if scale:
        count = (~grouped.isnan()).sum(dim=1, keepdim=True)
        var = (centred**2).nansum(dim=1, keepdim=True) / (count - 1).clamp(min=1)
        centred = centred / (var.sqrt() + STD_EPS)
    return torch.nan_to_num(centred.flatten(), nan=0.0).float()


def token_losses(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    spec: LossSpec,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-token loss (N, T), per-token KL (or None when beta is 0) and where the clip is active (bool).

    The clipped surrogate: -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A) with r = exp(logp - old_logp);
    plus beta x the k3 estimator exp(ref - logp) - (ref - logp) - 1 of KL(policy || reference).
    """
    adv = advantages[:, None]
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - spec.epsilon, 1 + spec.epsilon_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    active = ((ratio < 1 - spec.epsilon) & (adv < 0)) | ((ratio > 1 + spec.epsilon_high) & (adv > 0))
    kl = None
    if spec.beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probabilities")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + spec.beta * kl
    return loss, kl, active


def reduce_loss(per_token: torch.Tensor, mask: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """The micro-batch's summed loss, to be divided by the window's `weight` (see the module docstring)."""
    masked = per_token * mask
    if spec.loss == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum()
    if spec.loss == "dapo":
        return masked.sum()
    if spec.loss == "dr_grpo":
        return masked.sum() / spec.max_completion_length
    raise ValueError(f"unknown GRPO loss {spec.loss!r}: grpo, dapo or dr_grpo")


def loss_weight(mask: torch.Tensor, loss: str) -> int:
    """The batch's share of the window's normaliser: completion tokens for dapo, completions otherwise (rows
    with no completion token, a bad row's stand-in, count for nothing)."""
    return int(mask.sum()) if loss == "dapo" else int((mask.sum(-1) > 0).sum())
