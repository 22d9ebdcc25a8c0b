"""A cache of tokenised sources, so a second run over the same data skips reading and tokenising it.

An entry holds one source's kept token rows plus a journal of what happened to the others (bad rows skipped,
rows truncated or dropped), replayed on a hit so counts, logs, budgets and `data-check` reports come out the
same. The key covers everything the result depends on: the file's bytes (a changed file is a new key), how the
recipe names it, its format, the tokenizer's vocabulary and chat template, the row policies and the vlmtune
version. Entries are written to a temporary folder and renamed into place, so a crash or a concurrent run
never leaves a half entry to be read.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import vlmtune
from vlmtune.logging import get_logger

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from vlmtune.config.schema import DataConfig

logger = get_logger("data")

FORMAT_VERSION = 1  # bump when the entry layout or the encoding code's output changes


def cache_root() -> Path:
    """`$VLMTUNE_CACHE_DIR/tokenized`, default `~/.cache/vlmtune/tokenized`."""
    return Path(os.environ.get("VLMTUNE_CACHE_DIR") or "~/.cache/vlmtune").expanduser() / "tokenized"


@dataclass
class Encoded:
    """One source's encoding: kept rows (file order) and the journal of the rows that were not kept as read.

    Journal entries: `["bad", where, kind, problem]` (a skipped bad row), `["note", where, kind, problem,
    tokens]` (a row truncated or dropped; `kind` is `truncated` or `overlength`).
    """

    tokens: list[np.ndarray] = field(default_factory=list)
    trained: list[np.ndarray] = field(default_factory=list)
    rows_read: int = 0
    journal: list[list] = field(default_factory=list)


def _file_digest(path: Path, h) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
        with f.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """A digest of what tokenisation depends on; None when it cannot be taken (no cache then)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(backend.to_str().encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def source_key(path: Path, label: str, fmt: str, tok_fingerprint: str, cfg: DataConfig) -> str:
    """The cache key of one source under the recipe's row policies."""
    h = hashlib.sha256()
    policies = [cfg.max_length, cfg.on_overlength, cfg.on_bad_row, cfg.train_on_prompt]
    h.update(
        json.dumps([FORMAT_VERSION, vlmtune.__version__, label, fmt, tok_fingerprint, policies]).encode()
    )
    _file_digest(path, h)
    return h.hexdigest()


def load(key: str) -> Encoded | None:
    """The entry for `key`, or None (absent or unreadable: then it is simply rebuilt)."""
    folder = cache_root() / key
    if not (folder / "meta.json").is_file():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        with np.load(folder / "rows.npz", allow_pickle=False) as z:
            tokens, trained, lengths = z["tokens"], z["trained"], z["lengths"]
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("ignoring unreadable tokenisation cache entry %s (%s)", folder, exc)
        return None
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return Encoded(
        tokens=[tokens[a:b] for a, b in itertools.pairwise(bounds)],
        trained=[trained[a:b] for a, b in itertools.pairwise(bounds)],
        rows_read=meta["rows_read"],
        journal=meta["journal"],
    )


def save(key: str, encoded: Encoded) -> None:
    """Store `encoded` under `key`; failures (read-only or full disk) only cost the next run the re-encoding."""
    root = cache_root()
    final = root / key
    if final.exists():
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}-", dir=root))
        empty_i, empty_b = np.zeros(0, dtype=np.int32), np.zeros(0, dtype=bool)
        np.savez(
            tmp / "rows.npz",
            tokens=np.concatenate(encoded.tokens) if encoded.tokens else empty_i,
            trained=np.concatenate(encoded.trained) if encoded.trained else empty_b,
            lengths=np.array([len(t) for t in encoded.tokens], dtype=np.int64),
        )
        (tmp / "meta.json").write_text(
            json.dumps({"rows_read": encoded.rows_read, "journal": encoded.journal})
        )
        try:
            tmp.rename(final)
        except OSError:  # another process stored the same entry first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        logger.warning("could not write the tokenisation cache in %s (%s); continuing without it", root, exc)
