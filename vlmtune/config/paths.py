"""How a path written in a recipe is found: as given, else relative to the recipe file."""

from __future__ import annotations

import re
from pathlib import Path

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".csv")


def resolve_path(value: str | Path, base_dir: Path | None) -> Path:
    """A recipe path: as given (absolute or from the working directory), else relative to the recipe file."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists() or base_dir is None:
        return path.resolve() if path.exists() else path
    candidate = base_dir / path
    return candidate.resolve() if candidate.exists() else path


def is_hub_id(value: str) -> bool:
    """`org/name`, not written as a local path and without a data file's suffix: a Hugging Face hub id."""
    return bool(_HUB_ID.fullmatch(value)) and Path(value).suffix.lower() not in _DATA_SUFFIXES
