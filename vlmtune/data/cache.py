"""The on-disk index of encoded sources: built once per machine, then memory-mapped by every process.

An entry holds one source's kept rows (token ids, label mask, lengths, where each row came from, its image count
and image tokens) as `.npy` arrays, plus a journal of what happened to the other rows (bad rows skipped, rows
truncated or dropped), replayed on a hit so counts, logs, budgets and `data-check` reports come out the same.
The key covers everything the result depends on: the data's bytes (a changed file is a new key; images are
checked when collated instead, see `encode.Encoder.vision_inputs`), how the recipe names and reads it, the
encoder (vocabulary, chat template, image processor settings), the row policies and the encoding code itself.

Entries are written to a temporary folder and renamed into place, so a crash or a concurrent run never leaves a
half entry to be read. `building` takes a lock per key, so of the processes of one machine (the ranks of a run,
or two runs) one builds and the others wait, then map the same files: the pages are shared, not copied per rank.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlmtune.logging import get_logger

logger = get_logger("data")

FORMAT_VERSION = 3  # bump when the entry layout changes


def code_digest() -> str:
    """A digest of the code that encoding runs (the data package and the family registry): a new version of it
    is a new key, so an index is never read by code that would have encoded the rows differently."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for path in [*sorted(here.glob("*.py")), here.parent / "families.py"]:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def cache_root() -> Path:
    """`$VLMTUNE_CACHE_DIR/tokenized`, default `~/.cache/vlmtune/tokenized`."""
    return Path(os.environ.get("VLMTUNE_CACHE_DIR") or "~/.cache/vlmtune").expanduser() / "tokenized"


@dataclass
class Part:
    """One source's encoded rows, in file order, in flat arrays (memory-mapped when read from the cache).

    Attributes:
        tokens: Every kept row's token ids, end to end (int32).
        trained: Per token, whether it is trained.
        offsets: Row `r` is `tokens[offsets[r]:offsets[r + 1]]` (int64, one more than rows).
        rows: Each kept row's index in its source.
        images: Images per kept row.
        image_tokens: Image tokens per kept row.
        trained_counts: Trained tokens per kept row.
        splits: Per kept row, 0, or for a preference row the chosen sequence's tokens: the row's tokens are the
            chosen sequence then the rejected one.
        rows_read: Rows in the source, bad ones included.
        journal: The rows not kept as read, in order: `["bad", where, kind, problem]` (skipped under `skip`),
            `["note", where, kind, problem, tokens]` (`truncated` or `overlength`), `["raise", message]`.
    """

    tokens: np.ndarray
    trained: np.ndarray
    offsets: np.ndarray
    rows: np.ndarray
    images: np.ndarray
    image_tokens: np.ndarray
    trained_counts: np.ndarray
    splits: np.ndarray
    rows_read: int = 0
    journal: list[list] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


_STREAMED = {"tokens": np.int32, "trained": np.bool_}  # written chunk by chunk: they grow with the data
_PER_ROW = ("offsets", "rows", "images", "image_tokens", "trained_counts", "splits")


def file_digest(path: Path, h) -> None:
    """Feed the bytes of a file, or of every file under a folder (with their names), into `h`."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
        with f.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")


def source_key(data: Path | str, description: list, encoder_fingerprint: str) -> str:
    """The cache key of one source: its data (a file or folder's bytes, or a string such as a `datasets`
    fingerprint), how it is read (`description`: label, format, columns, policies), and the encoder."""
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, code_digest(), description, encoder_fingerprint]).encode())
    if isinstance(data, Path):
        file_digest(data, h)
    else:
        h.update(data.encode())
    return h.hexdigest()


@contextmanager
def building(key: str | None) -> Iterator[None]:
    """Hold the lock of `key` while looking it up and building it: one process per machine builds an entry,
    the others wait here and then read it. No lock (and no cache) when the folder cannot be written."""
    if key is None:
        yield
        return
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = (root / f".{key}.lock").open("a")
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield


def load(key: str) -> Part | None:
    """The entry for `key`, memory-mapped, or None (absent or unreadable: then it is simply rebuilt)."""
    folder = cache_root() / key
    if not (folder / "meta.json").is_file():
        return None
    try:
        return read(folder)
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("ignoring unreadable data index entry %s (%s)", folder, exc)
        return None


def read(folder: Path) -> Part:
    """The part written in `folder`, its arrays memory-mapped (read-only, shared by every process mapping it)."""
    meta = json.loads((folder / "meta.json").read_text())
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in _PER_ROW}
    tokens = int(arrays["offsets"][-1])
    for name, dtype in _STREAMED.items():
        # np.memmap refuses an empty file: an empty part has nothing to map.
        arrays[name] = (
            np.memmap(folder / f"{name}.bin", dtype=dtype, mode="r") if tokens else np.zeros(0, dtype)
        )
    return Part(**arrays, rows_read=meta["rows_read"], journal=meta["journal"])


class PartWriter:
    """Writes a part chunk by chunk into a new folder (token arrays appended to files, so the builder never holds
    a whole source's tokens in memory), then publishes it under its cache key or reads it back.

    Args:
        key: The cache key; None writes to a temporary folder, removed once read back (the mapping stays valid).
    """

    def __init__(self, key: str | None) -> None:
        self.key = key
        root = cache_root()
        try:
            if key is None:
                raise OSError("no cache")
            root.mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix=f".{key[:16]}-", dir=root))
        except OSError as exc:
            if key is not None:
                logger.warning("could not write the data index in %s (%s); continuing without it", root, exc)
            self.key = None
            self.folder = Path(tempfile.mkdtemp(prefix="vlmtune-index-"))
        self._files = {name: (self.folder / f"{name}.bin").open("wb") for name in _STREAMED}
        self._per_row: dict[str, list] = {name: [] for name in _PER_ROW if name != "offsets"}
        self._lengths: list[int] = []

    def add(
        self, row: int, ids: np.ndarray, trained: np.ndarray, images: int, image_tokens: int, split: int = 0
    ) -> None:
        """Append one kept row (`split`: see `Part.splits`)."""
        self._files["tokens"].write(np.ascontiguousarray(ids, dtype=np.int32).tobytes())
        self._files["trained"].write(np.ascontiguousarray(trained, dtype=np.bool_).tobytes())
        self._lengths.append(len(ids))
        for name, value in (
            ("rows", row), ("images", images), ("image_tokens", image_tokens), ("trained_counts", int(trained.sum())),
            ("splits", split),
        ):  # fmt: skip
            self._per_row[name].append(value)

    def finish(self, rows_read: int, journal: list[list]) -> Part:
        """Close the files, publish the entry (when caching) and map it."""
        for f in self._files.values():
            f.close()
        offsets = np.concatenate([[0], np.cumsum(np.asarray(self._lengths, dtype=np.int64))]).astype(np.int64)
        np.save(self.folder / "offsets.npy", offsets, allow_pickle=False)
        dtypes = {
            "rows": np.int64, "images": np.int32, "image_tokens": np.int32, "trained_counts": np.int32,
            "splits": np.int64,
        }  # fmt: skip
        for name, values in self._per_row.items():
            np.save(self.folder / f"{name}.npy", np.asarray(values, dtype=dtypes[name]), allow_pickle=False)
        (self.folder / "meta.json").write_text(json.dumps({"rows_read": rows_read, "journal": journal}))
        if self.key is None:
            part = read(self.folder)
            shutil.rmtree(self.folder, ignore_errors=True)
            return part
        final = cache_root() / self.key
        try:
            self.folder.rename(final)
        except OSError:  # another process stored the same entry first
            shutil.rmtree(self.folder, ignore_errors=True)
        return read(final)

    def discard(self) -> None:
        """Drop a half-written part (the build failed)."""
        for f in self._files.values():
            f.close()
        shutil.rmtree(self.folder, ignore_errors=True)
