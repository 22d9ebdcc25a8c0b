"""The seam between the shared step and a training method (sft, dpo, grpo, distill).

A method is a loss and what a step needs before it (a reference pass, rollouts), never a second trainer: the
loop (`engine/loop.py`) owns accumulation, normalisation across micro-batches and ranks, clipping, the
non-finite policy, checkpoints and metrics for all of them.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

Batch = dict[str, torch.Tensor]


class Method(Protocol):
    """What the loop asks of a training method.

    The step's loss is `sum(loss_sum(mb)) / sum(weight(mb))` over the window's micro-batches on every rank, so a
    method chooses its normaliser (trained tokens for sft, pairs for dpo, completions or completion tokens for
    grpo) and the update stays the same however the window is split into micro-batches and ranks.
    """

    # Names of the extra sums `loss_sum` returns beside the loss; reduced over ranks with it (no extra sync).
    metric_names: tuple[str, ...]

    def prepare(self, step: int, micro_batches: list[Batch], *, training: bool) -> list[Batch]:
        """The micro-batches the loss reads: collated host batches in, batches (host or device) out.

        sft returns them as they are; dpo adds the reference model's log-probabilities; grpo generates
        completions, scores them and returns the completion batches.
        """
        ...

    def weight(self, batch: Batch) -> int:
        """The share of the step's normaliser in `batch`, counted on the host."""
        ...

    def loss_sum(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed loss of `batch` (with its graph) and a vector of `metric_names` sums (detached)."""
        ...

    def summarise(
        self, loss: float, sums: dict[str, float], weight: float, *, eval: bool
    ) -> dict[str, float]:
        """Entries of a metrics record from the window's (or eval set's) loss, summed `metric_names` and weight."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Per-rank state exact resume needs beyond the model, optimizer and RNGs (e.g. a rollout buffer)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
