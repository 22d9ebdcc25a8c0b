"""What happens to a row that cannot be used: raise at once, or skip it, count it and stay within a budget."""

from __future__ import annotations

from collections import Counter
from typing import Literal

from vlmtune.errors import DataError
from vlmtune.logging import get_logger

logger = get_logger("data")

# Kinds, as counted in `DataStats.skipped_bad`. A closed list keeps the summary and the docs in step.
BAD_ROW_KINDS = (
    "unparsable",
    "missing_key",
    "wrong_type",
    "empty_conversation",
    "unknown_role",
    "no_assistant_turn",
    "role_order",
    "empty_content",
    "template_error",
    "no_trained_tokens",
    # Image-text rows:
    "image_count_mismatch",  # placeholders in the text != images given
    "bad_image",  # an image is missing, unreadable, truncated or too large
    "images_required",  # the family cannot train on a text-only row (PaliGemma)
    "image_not_in_user_turn",  # an image in a system or assistant message: only prompts show images
)

# Enough examples to see a pattern without flooding the log of a run over a dirty million-row file.
_LOGGED_EXAMPLES = 5


class BadRow(Exception):
    """A row that cannot be used, raised where the problem is found and located by the caller.

    Args:
        kind: One of `BAD_ROW_KINDS`.
        problem: What is wrong and what was expected, without the file and row (the caller adds them).
    """

    def __init__(self, kind: str, problem: str) -> None:
        if kind not in BAD_ROW_KINDS:
            raise ValueError(f"unknown bad-row kind {kind!r}")
        self.kind = kind
        self.problem = problem
        super().__init__(problem)


def bad_row_error(bad: BadRow, where: str) -> DataError:
    """What `data.on_bad_row: raise` stops with: the row, its problem, and how to skip such rows instead."""
    return DataError(
        f"{where}: {bad.problem}\n(set data.on_bad_row: skip to skip such rows and count them instead)"
    )


class BadRowTracker:
    """Applies `data.on_bad_row` and `data.max_bad_fraction` across every source of one dataset.

    Args:
        policy: `raise` turns the first bad row into a `DataError`; `skip` counts it by kind.
        max_bad_fraction: With `skip`, the largest tolerated fraction of bad rows among the rows read.
    """

    def __init__(self, policy: Literal["raise", "skip"], max_bad_fraction: float) -> None:
        self.policy = policy
        self.max_bad_fraction = max_bad_fraction
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def handle(self, bad: BadRow, where: str) -> None:
        """Raise or count `bad`, found at `where` (e.g. `data/train.jsonl row 17 (line 18)`).

        Raises:
            DataError: under `on_bad_row: raise`.
        """
        if self.policy == "raise":
            raise bad_row_error(bad, where)
        message = f"{where}: {bad.problem}"
        self.counts[bad.kind] += 1
        if len(self.examples) < _LOGGED_EXAMPLES:
            self.examples.append(message)
            logger.warning("skipping bad row: %s", message)

    def check_budget(self, rows_read: int) -> None:
        """Stop when more rows were bad than `max_bad_fraction` allows: a mostly broken file is not data.

        Raises:
            DataError: naming the count, the budget, the kinds and a few examples.
        """
        if rows_read == 0 or self.total / rows_read <= self.max_bad_fraction:
            return
        kinds = ", ".join(f"{kind}: {n}" for kind, n in self.counts.most_common())
        examples = "\n".join(f"  - {e}" for e in self.examples)
        raise DataError(
            f"{self.total} of {rows_read} rows ({self.total / rows_read:.1%}) are bad and were skipped, "
            f"more than data.max_bad_fraction={self.max_bad_fraction} ({self.max_bad_fraction:.1%}) allows "
            f"({kinds}).\nFirst bad rows:\n{examples}\n"
            "Fix the data, or raise data.max_bad_fraction if losing these rows is acceptable."
        )
