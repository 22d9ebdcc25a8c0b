"""Finding and reading data sources: .jsonl, .json, .parquet files, `datasets.save_to_disk` folders, dataset
repository folders and hub dataset ids.

Files are read through `datasets`, which memory-maps them as Arrow. Its errors on a broken JSON line are cryptic,
so when it fails on a JSON file the file is re-read here with `json`, line by line: a line that does not parse
becomes an `Unparsable` row, located by line number and left to the bad-row policy like any other bad row.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmtune.config.paths import is_hub_id, resolve_path
from vlmtune.config.schema import DataSource
from vlmtune.errors import DataError
from vlmtune.logging import get_logger

logger = get_logger("data")

SUPPORTED = (".jsonl", ".json", ".parquet")
_DISK_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes for a DatasetDict / a Dataset
_SUPPORTED_TEXT = (
    ", ".join(SUPPORTED)
    + ", a directory written by datasets' save_to_disk, a dataset repository folder, or a hub "
    "dataset id"
)


@dataclass(frozen=True)
class Unparsable:
    """A line of a JSON Lines file that is not valid JSON."""

    error: str


@dataclass
class LoadedSource:
    """The rows of one data source, in file order.

    Attributes:
        label: The path as the recipe gave it (plus the split, if any), used in every message about it.
        path: Where the file was found.
        rows: Rows as Python objects; a broken JSON line is an `Unparsable` in its place.
        is_jsonl: Whether rows are lines of a text file, so messages can name line numbers.
        is_repository: A dataset repository (a folder of data files, or a hub dataset).
    """

    label: str
    path: Path
    rows: Sequence[Any]
    is_jsonl: bool = False
    is_repository: bool = False
    _lines: list[int] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.rows)

    def chunk(self, start: int, end: int) -> list[Any]:
        """Rows `start..end-1`: read in one slice from an Arrow table (much faster than row by row)."""
        if hasattr(self.rows, "column_names") and hasattr(self.rows, "select"):
            columns = self.rows[start:end]
            names = list(columns)
            return [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]
        return [self.rows[i] for i in range(start, end)]

    def where(self, index: int) -> str:
        """`label row N`, plus the 1-based line number for JSON Lines: how errors point at a row."""
        if not self.is_jsonl:
            return f"{self.label} row {index}"
        if self._lines is None:
            # Computed only when a message needs it: a clean file is never scanned twice.
            self._lines = _nonblank_lines(self.path)
        return f"{self.label} row {index} (line {self._lines[index]})"


def find_path(path: str, base_dir: Path | None = None) -> Path:
    """A data path that exists, found as `config.paths.resolve_path` finds every recipe path.

    Raises:
        DataError: nothing there; says where it looked and suggests near names.
    """
    found = resolve_path(path, base_dir)
    if found.exists():
        return found.resolve()
    given = Path(path).expanduser()
    candidates = [given.resolve()]
    if not given.is_absolute() and base_dir is not None:
        candidates.append((Path(base_dir) / given).resolve())
    looked = " and ".join(str(c) for c in dict.fromkeys(candidates))
    hint = ""
    near = [m for c in candidates for m in _near_names(c)]
    if near:
        hint = f" Did you mean {' or '.join(repr(n) for n in dict.fromkeys(near))}?"
    raise DataError(
        f"data file {path!r} not found: looked at {looked}. Relative paths are resolved against the current "
        f"directory, then the recipe's folder; fix the path in the recipe's data section.{hint}"
    )


def source_label(source: DataSource) -> str:
    """How messages name a source: its path as the recipe gives it, with the configuration and split if set."""
    label = source.path + (f":{source.name}" if source.name else "")
    return f"{label}[{source.split}]" if source.split else label


def locate(source: DataSource, base_dir: Path | None = None) -> Path | None:
    """The local file or folder of `source`, or None for a hub dataset id that names nothing local.

    Raises:
        DataError: neither a local path nor a hub id (says where it looked).
    """
    try:
        return find_path(source.path, base_dir)
    except DataError:
        if is_hub_id(source.path):
            return None
        raise


def load_source(source: DataSource, *, base_dir: Path | None = None) -> LoadedSource:
    """Read every row of `source` (Arrow-backed sources stay memory-mapped: rows are read when indexed).

    Raises:
        DataError: a missing path, an unsupported file type, a missing split, or an unreadable file.
    """
    loaded = _load(source, base_dir)
    if source.columns:
        loaded.rows = _renamed(loaded.rows, source.columns, loaded.label)
    return loaded


def _load(source: DataSource, base_dir: Path | None) -> LoadedSource:
    path = locate(source, base_dir)
    label = source_label(source)
    if path is None:
        rows = _load_repository(source.path, source, label)
        return LoadedSource(label, Path(source.path), rows, is_repository=True)
    if path.is_dir():
        if any((path / marker).exists() for marker in _DISK_MARKERS):
            return LoadedSource(label, path, _load_from_disk(path, source))
        return LoadedSource(label, path, _load_repository(str(path), source, label), is_repository=True)
    if source.split is not None:
        raise DataError(
            f"{source.path}: split {source.split!r} is set, but splits only apply to a folder (save_to_disk's "
            "DatasetDict, or a dataset repository) or a hub dataset; remove `split` from this source"
        )
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return LoadedSource(label, path, _load_with_datasets("parquet", path))
    if suffix in (".jsonl", ".json"):
        return _load_json(label, path, jsonl=suffix == ".jsonl")
    raise DataError(
        f"{source.path}: unsupported data file type {path.suffix!r}; supported: {_SUPPORTED_TEXT}"
    )


@contextmanager
def datasets_progress(enabled: bool) -> Iterator[None]:
    """Let `datasets` draw its progress bars only when ours are on (the main process)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    if not enabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            datasets.enable_progress_bars()


def _load_with_datasets(builder: str, path: Path) -> Any:
    from datasets import load_dataset

    return load_dataset(builder, data_files=str(path), split="train")


@contextmanager
def _datasets_errors_silenced() -> Iterator[None]:
    """Hide datasets' own log lines about a file it cannot parse: we report those rows, located, ourselves."""
    from datasets.utils import logging as datasets_logging

    level = datasets_logging.get_verbosity()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)
    try:
        yield
    finally:
        datasets_logging.set_verbosity(level)


def _load_json(label: str, path: Path, *, jsonl: bool) -> LoadedSource:
    try:
        with _datasets_errors_silenced():
            return LoadedSource(label, path, _load_with_datasets("json", path), is_jsonl=jsonl)
    except Exception as exc:  # datasets raises several types here (ValueError, its own); our reader decides
        # A line that does not parse, or rows Arrow cannot give one schema: read the file ourselves, so each
        # broken row is reported with its line number instead of datasets' message.
        logger.debug(
            "datasets could not read %s (%s: %s); reading it line by line", label, type(exc).__name__, exc
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{label}: cannot read the file: {exc}") from None
    if not jsonl:
        try:
            return LoadedSource(label, path, _parse_json_array(label, json.loads(text)))
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":
                raise DataError(
                    f"{label}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                    "expected a JSON array of row objects, or JSON Lines"
                ) from None
            # Several top-level values: JSON Lines saved with a .json name, which datasets also accepts.
    rows, lines = _parse_json_lines(text)
    return LoadedSource(label, path, rows, is_jsonl=True, _lines=lines)


def _parse_json_array(label: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise DataError(
            f"{label}: the file holds one JSON {type(value).__name__}; expected an array of row objects"
        )
    return value


def _parse_json_lines(text: str) -> tuple[list[Any], list[int]]:
    rows: list[Any] = []
    lines: list[int] = []
    # Split on "\n" only, as datasets does: str.splitlines() would also break at U+2028 and other separators
    # that JSON strings may hold raw.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # datasets skips blank lines too, so row numbers agree whichever reader ran
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            rows.append(
                Unparsable(
                    f"not valid JSON ({exc.msg} at column {exc.colno}); expected one JSON object per line"
                )
            )
        lines.append(number)
    return rows, lines


def _nonblank_lines(path: Path) -> list[int]:
    # Binary mode splits on b"\n" only, like the JSON Lines readers; text mode would also split at a lone "\r".
    with path.open("rb") as f:
        return [number for number, line in enumerate(f, start=1) if line.strip()]


def _load_from_disk(path: Path, source: DataSource) -> Any:
    from datasets import DatasetDict, load_from_disk

    loaded = load_from_disk(str(path))
    if not isinstance(loaded, DatasetDict):
        if source.split is not None:
            raise DataError(
                f"{source.path}: split {source.split!r} is set, but this directory holds a single Dataset "
                "with no splits; remove `split` from this source"
            )
        return loaded
    split = source.split or "train"
    if split not in loaded:
        raise DataError(
            f"{source.path}: no split {split!r} in this DatasetDict; available splits: "
            f"{', '.join(sorted(loaded))}. Set `split` on this source to one of them"
        )
    return loaded[split]


def _load_repository(where: str, source: DataSource, label: str) -> Any:
    """A dataset repository, local (a folder of data files) or on the hub, through `datasets.load_dataset`."""
    from datasets import load_dataset

    split = source.split or "train"
    try:
        return load_dataset(where, name=source.name, split=split, revision=source.revision)
    except Exception as exc:  # datasets raises many types (missing split, config, network, no data files)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{label}: cannot load the dataset repository {where!r} (split {split!r}"
            f"{f', name {source.name!r}' if source.name else ''}): {first}. Check the path (a local folder of "
            "data files, or a hub id with network access), `split` and `name`"
        ) from None


class _RenamedRows(Sequence):
    """Rows of a plain list with some keys renamed (`columns:`), renamed as they are read."""

    def __init__(self, rows: Sequence[Any], rename: dict[str, str]) -> None:
        self._rows, self._rename = rows, rename

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> Any:
        row = self._rows[i]
        if not isinstance(row, dict):
            return row  # an Unparsable line, or not an object: the format reports it
        return {self._rename.get(k, k): v for k, v in row.items() if k not in self._shadowed(row)}

    def _shadowed(self, row: dict) -> set[str]:
        # A format column the source also has under its own name gives way to the mapped one.
        return {new for old, new in self._rename.items() if old in row and new in row}


def _renamed(rows: Sequence[Any], columns: dict[str, str], label: str) -> Sequence[Any]:
    """`rows` with each source column `columns[name]` read as the format's `name`."""
    rename = {src: name for name, src in columns.items() if src != name}
    names = getattr(rows, "column_names", None)
    if names is None:
        return _RenamedRows(rows, rename)
    missing = sorted(src for src in rename if src not in names)
    if missing:
        raise DataError(
            f"{label}: columns maps onto {', '.join(repr(m) for m in missing)}, which the source does not have "
            f"(its columns: {', '.join(names)}); fix data.*.columns"
        )
    clashing = [new for new in rename.values() if new in names]
    return rows.remove_columns(clashing).rename_columns(rename) if clashing else rows.rename_columns(rename)


def _near_names(missing: Path) -> list[str]:
    parent = missing.parent
    if not parent.is_dir():
        return []
    names = [p.name for p in parent.iterdir()]
    return [str(parent / n) for n in difflib.get_close_matches(missing.name, names, n=2, cutoff=0.6)]
