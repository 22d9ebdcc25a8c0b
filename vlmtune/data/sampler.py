"""Which rows each rank trains on at each optimizer step: a pure function of (seed, step).

Because the data position is derived from the step counter, resuming at step N replays exactly the batches an
uninterrupted run would have seen, with no sampler state to save. Every step sees one full global batch
(micro_batch × grad_accum × world_size rows): an epoch's shuffled order is padded by wrapping around, as
DistributedSampler does, so all ranks run the same number of micro-batches and accumulation windows are whole.
The rows of a global batch do not depend on the world size, so 1 process × 8 rows and 2 × 4 train alike.
"""

from __future__ import annotations

import math

import torch


class StepSampler:
    def __init__(self, n_rows: int, *, micro_batch: int, grad_accum: int, world_size: int, seed: int) -> None:
        if n_rows <= 0:
            raise ValueError("no training rows")
        self.n_rows = n_rows
        self.micro_batch = micro_batch
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.seed = seed
        self.global_batch = micro_batch * grad_accum * world_size
        self.steps_per_epoch = math.ceil(n_rows / self.global_batch)
        self._cached: tuple[int, list[int]] | None = None

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _order(self, epoch: int) -> list[int]:
        if self._cached is None or self._cached[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n_rows, generator=g).tolist()
            need = self.steps_per_epoch * self.global_batch
            order = (order * math.ceil(need / self.n_rows))[:need]
            self._cached = (epoch, order)
        return self._cached[1]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Row indices of this rank's `grad_accum` micro-batches for optimizer step `step` (0-based)."""
        order = self._order(self.epoch_of(step))
        start = (step % self.steps_per_epoch) * self.global_batch
        rows = order[start : start + self.global_batch]
        out = []
        for m in range(self.grad_accum):
            first = (m * self.world_size + rank) * self.micro_batch
            out.append(rows[first : first + self.micro_batch])
        return out
