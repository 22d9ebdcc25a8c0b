"""Counts describing what the data pipeline read, kept, dropped and will train on."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class DataStats:
    """What `build_dataset` did with the rows.

    Row counts (`rows_read`, `dropped_overlength`, `truncated`, `skipped_bad`) are over the rows in the files,
    before weighting; `rows_used`, `per_source` and the token counts are over the dataset's examples, after it.

    Attributes:
        rows_read: Rows in all sources, unparsable lines included.
        rows_used: Examples in the dataset.
        dropped_overlength: Rows over `max_length` dropped, including truncated rows with no trained token left.
        truncated: Rows cut to `max_length` and kept.
        skipped_bad: Bad rows skipped, by kind (see `bad_rows.BAD_ROW_KINDS`).
        per_source: Examples each source contributes, by its path as given.
        trained_tokens: Tokens with a label, over all examples.
        total_tokens: All tokens, over all examples.
    """

    rows_read: int = 0
    rows_used: int = 0
    dropped_overlength: int = 0
    truncated: int = 0
    skipped_bad: dict[str, int] = field(default_factory=dict)
    per_source: dict[str, int] = field(default_factory=dict)
    trained_tokens: int = 0
    total_tokens: int = 0

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped_bad.values())

    def summary(self) -> str:
        """One line for the log."""
        sources = ", ".join(f"{name}: {n:,}" for name, n in self.per_source.items())
        parts = [f"{self.rows_read:,} rows read, {self.rows_used:,} examples ({sources})"]
        if self.skipped_bad:
            kinds = ", ".join(f"{kind}: {n:,}" for kind, n in sorted(self.skipped_bad.items()))
            parts.append(f"skipped {self.skipped_total:,} bad ({kinds})")
        if self.dropped_overlength:
            parts.append(f"dropped {self.dropped_overlength:,} over max_length")
        if self.truncated:
            parts.append(f"truncated {self.truncated:,}")
        share = self.trained_tokens / self.total_tokens if self.total_tokens else 0.0
        parts.append(f"{self.total_tokens:,} tokens, {self.trained_tokens:,} trained ({share:.1%})")
        return "data: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for JSON and experiment trackers."""
        return asdict(self)
