"""How a path written in a recipe is found: as given, else relative to the recipe file."""

from __future__ import annotations

from pathlib import Path


def resolve_path(value: str | Path, base_dir: Path | None) -> Path:
    """A recipe path: as given (absolute or from the working directory), else relative to the recipe file."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists() or base_dir is None:
        return path.resolve() if path.exists() else path
    candidate = base_dir / path
    return candidate.resolve() if candidate.exists() else path
