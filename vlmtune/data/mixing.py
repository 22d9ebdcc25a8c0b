"""Source weights: how many of a source's rows the dataset holds, chosen reproducibly."""

from __future__ import annotations

import math
import random


def weighted_take(num_rows: int, weight: float, *, seed: int, source_index: int) -> list[int]:
    """Row indices a source contributes: round(weight × num_rows) of them, rounded half up.

    Whole copies of the rows come first, then a seeded random subset for the fraction, kept in file order so
    the dataset's order is deterministic (the trainer shuffles each epoch itself).

    Args:
        num_rows: Usable rows in the source.
        weight: The source's weight; 0.5 takes half, 2 repeats every row twice, 1.5 once plus a random half.
        seed: The run's seed.
        source_index: The source's position in the list, so each source draws its own subset.

    Returns:
        Indices into the source's rows, possibly repeated.
    """
    target = math.floor(weight * num_rows + 0.5)
    if num_rows == 0 or target == 0:
        return []
    copies, rest = divmod(target, num_rows)
    # A string seed is hashed with SHA-512 by `random`, so the draw is the same in every process and run.
    rng = random.Random(f"vlmtune-mix:{seed}:{source_index}")
    return list(range(num_rows)) * copies + sorted(rng.sample(range(num_rows), rest))
