"""Which rows each rank trains on at each optimizer step: a pure function of (seed, step).

Because the data position is derived from the step counter, resuming at step N replays exactly the batches an
uninterrupted run would have seen, with no sampler state to save. Every step sees one full global batch
(micro_batch × grad_accum × world_size items): an epoch's shuffled order is padded by wrapping around, as
DistributedSampler does, so all ranks run the same number of micro-batches and accumulation windows are whole.
The items of a global batch do not depend on the world size, so 1 process × 8 rows and 2 × 4 train alike.

An item is a row, or, with `units`, a fixed group of rows (a packed bin or a token-budget chunk, see
`data/packing.py`) formed once before training, so the number of items, and steps per epoch, are known up front.

With several processes and per-row `costs`, a step's items are dealt to ranks by cost (largest first, each to
the least-loaded rank with room) instead of in order: a rank that draws the long rows makes every other rank wait
at each collective. The step holds the same items and the loss is normalised over the whole window, so the
gradient is the same; the assignment is still a pure function of (seed, step). Not with length grouping, whose
micro-batches are already decided.
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
        costs: Each row's work (tokens, image tokens counted again for the vision tower); with several processes,
            `rank_loads` reports each rank's share of a step from it.
        balanced: With `costs` and several processes, deal each step's items to ranks by cost instead of in order.
        repeat: Consecutive optimizer steps that train on the same items (GRPO optimises one batch of rollouts
            for `grpo.steps_per_generation` steps): an epoch has `repeat` times as many steps, and every item
            is still drawn once per epoch.
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
        costs: Sequence[int] | None = None,
        balanced: bool = False,
        repeat: int = 1,
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
        self.costs = list(costs) if costs is not None and world_size > 1 else None
        # Length grouping already decides the micro-batches; balancing would break them up.
        self.balanced = balanced and self.costs is not None and not group_by_length
        self.global_batch = micro_batch * grad_accum * world_size
        self.repeat = repeat
        self._batches_per_epoch = math.ceil(n_items / self.global_batch)
        self.steps_per_epoch = self._batches_per_epoch * repeat
        self._cached: tuple[int, list[int]] | None = None

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _order(self, epoch: int) -> list[int]:
        if self._cached is None or self._cached[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n_rows, generator=g).tolist()
            need = self._batches_per_epoch * self.global_batch
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
        out = []
        for chosen in self._assigned(step)[rank]:
            if self.units is None:
                out.append(chosen)
            elif self.flatten_units:
                out.append([row for u in chosen for row in self.units[u]])
            else:
                out.append([list(self.units[u]) for u in chosen])
        return out

    def _assigned(self, step: int) -> list[list[list[int]]]:
        """Items of step `step` per rank, per micro-batch: dealt in order, or balanced by cost."""
        order = self._order(self.epoch_of(step))
        start = (step % self.steps_per_epoch) // self.repeat * self.global_batch
        items = order[start : start + self.global_batch]
        mb, ws = self.micro_batch, self.world_size
        if not self.balanced:
            return [
                [items[(m * ws + r) * mb : (m * ws + r + 1) * mb] for m in range(self.grad_accum)]
                for r in range(ws)
            ]
        out = []
        for dealt in balance(items, [self.item_cost(i) for i in items], ws):
            # Largest first: each micro-batch holds items of similar cost (less padding), and the ranks' k-th
            # micro-batches are alike too (ZeRO-3 / FSDP gather at every forward).
            dealt = sorted(dealt, key=lambda i: -self.item_cost(i))
            out.append([dealt[m * mb : (m + 1) * mb] for m in range(self.grad_accum)])
        return out

    def item_cost(self, item: int) -> int:
        """The cost of an item (a row, or the rows of a unit); 0 without costs."""
        if self.costs is None:
            return 0
        return (
            sum(self.costs[row] for row in self.units[item]) if self.units is not None else self.costs[item]
        )

    def rank_loads(self, step: int) -> list[int]:
        """Each rank's total cost at step `step` (every rank can compute every rank's: no communication)."""
        return [sum(self.item_cost(i) for mb in micro for i in mb) for micro in self._assigned(step)]


def balance(items: Sequence[int], costs: Sequence[int], n_bins: int) -> list[list[int]]:
    """Deal `items` (a multiple of `n_bins` of them) into `n_bins` lists of equal size with near-equal total cost:
    longest processing time first, each item to the least-loaded list that has room (ties by position, so the
    result is a pure function of the inputs). Within a list, items keep their original order."""
    per_bin = len(items) // n_bins
    order = sorted(range(len(items)), key=lambda k: (-costs[k], k))
    loads, bins = [0] * n_bins, [[] for _ in range(n_bins)]
    for k in order:
        b = min((b for b in range(n_bins) if len(bins[b]) < per_bin), key=lambda b: (loads[b], b))
        bins[b].append(k)
        loads[b] += costs[k]
    return [[items[k] for k in sorted(b)] for b in bins]
