"""Which rows each rank trains on at each optimizer step: a pure function of (seed, step).

Because the data position is derived from the step counter, resuming at step N replays exactly the batches an
uninterrupted run would have seen, with no sampler state to save. Every step sees one full global batch
(micro_batch × grad_accum × world_size items): an epoch's shuffled order is padded by wrapping around, as
DistributedSampler does, so all ranks run the same number of micro-batches and accumulation windows are whole.
The items of a global batch do not depend on the world size, so 1 process × 8 rows and 2 × 4 train alike.

An item is a row, or, with `units`, a fixed group of rows (a packed bin or a token-budget chunk, see
`data/packing.py`) formed once before training, so the number of items, and steps per epoch, are known up front.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# Length grouping sorts within windows of this many micro-batches: enough to find rows of similar length,
# few enough that the epoch stays shuffled (the windows, and the micro-batches in them, are in random order).
MEGA_BATCH_MICRO_BATCHES = 50


class StepSampler:
    """Row indices per (step, rank, micro-batch).

    Args:
        n_rows: Rows (items) in the dataset; ignored when `units` is given.
        micro_batch: Items per micro-batch.
        units: Each item's rows; a micro-batch is then a list of units (each a list of rows), or with
            `flatten_units`, the concatenation of its units' rows.
        lengths: Each row's length in tokens; with `group_by_length`, micro-batches hold rows of similar length.
    """

    def __init__(
        self,
        n_rows: int,
        *,
        micro_batch: int,
        grad_accum: int,
        world_size: int,
        seed: int,
        units: list[list[int]] | None = None,
        flatten_units: bool = False,
        lengths: Sequence[int] | None = None,
        group_by_length: bool = False,
    ) -> None:
        self.units = units
        self.flatten_units = flatten_units
        n_items = len(units) if units is not None else n_rows
        if n_items <= 0:
            raise ValueError("no training rows")
        if group_by_length and (lengths is None or units is not None):
            raise ValueError("group_by_length needs per-row lengths, and works on rows, not units")
        self.n_rows = n_items
        self.micro_batch = micro_batch
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.seed = seed
        self.lengths = list(lengths) if group_by_length else None
        self.global_batch = micro_batch * grad_accum * world_size
        self.steps_per_epoch = math.ceil(n_items / self.global_batch)
        self._cached: tuple[int, list[int]] | None = None

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _order(self, epoch: int) -> list[int]:
        if self._cached is None or self._cached[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n_rows, generator=g).tolist()
            need = self.steps_per_epoch * self.global_batch
            order = (order * math.ceil(need / self.n_rows))[:need]
            if self.lengths is not None:
                order = self._grouped(order, g)
            self._cached = (epoch, order)
        return self._cached[1]

    def _grouped(self, order: list[int], g: torch.Generator) -> list[int]:
        """Sort each mega-batch by length, cut it into micro-batches, and shuffle those micro-batches.

        The same rows as `order`, so every row is still seen once per epoch; only their grouping changes.
        """
        mb, lengths = self.micro_batch, self.lengths
        size = mb * MEGA_BATCH_MICRO_BATCHES
        batches: list[list[int]] = []
        for start in range(0, len(order), size):
            mega = sorted(order[start : start + size], key=lambda i: -lengths[i])
            batches += [mega[k : k + mb] for k in range(0, len(mega), mb)]
        # A whole number of micro-batches (len(order) is a multiple of the global batch): shuffling them keeps
        # each one intact while spreading long ones over the epoch.
        perm = torch.randperm(len(batches), generator=g).tolist()
        return [row for b in perm for row in batches[b]]

    def micro_batches(self, step: int, rank: int) -> list[list]:
        """This rank's `grad_accum` micro-batches for optimizer step `step` (0-based).

        Each is a list of row indices, or with `units` (not flattened) a list of units, each a list of rows.
        """
        order = self._order(self.epoch_of(step))
        start = (step % self.steps_per_epoch) * self.global_batch
        items = order[start : start + self.global_batch]
        out = []
        for m in range(self.grad_accum):
            first = (m * self.world_size + rank) * self.micro_batch
            chosen = items[first : first + self.micro_batch]
            if self.units is None:
                out.append(chosen)
            elif self.flatten_units:
                out.append([row for u in chosen for row in self.units[u]])
            else:
                out.append([list(self.units[u]) for u in chosen])
        return out
