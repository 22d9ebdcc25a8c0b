"""`build_dataset`: data sources in, one encoded, label-masked, weighted dataset out, for text and image-text rows.

Each source is read, every row normalised, checked and encoded (bad and over-length rows handled by the recipe's
policies), and only then weighted, so a weight below 1 never hides a broken row from the checks. The result is
an index: token ids, label masks, lengths and where each row came from, in flat arrays that the cache
memory-maps; never pixels. An image-text row's images are decoded when the row is read (`IndexedDataset
.__getitem__`, in the DataLoader workers, as its micro-batch is collated). Repeats from a weight above 1 are
indices, not copies.

Encoding runs in parallel over the machine's cores, once per machine: of the processes of a run, one builds a
source's index while the others wait for it (`cache.building`), then all map the same files.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from vlmtune.config.schema import DataConfig, DataSource
from vlmtune.data import cache
from vlmtune.data.bad_rows import BadRow, BadRowTracker
from vlmtune.data.encode import IGNORE_INDEX, EncodedPair, EncodedRow, Encoder
from vlmtune.data.formats import normalise
from vlmtune.data.indexed import IndexedDataset, ReadBack
from vlmtune.data.mixing import weighted_take
from vlmtune.data.sources import (
    LoadedSource,
    Unparsable,
    datasets_progress,
    find_path,
    load_source,
    locate,
    source_label,
)
from vlmtune.data.stats import DataStats
from vlmtune.data.template import ChatTemplateError
from vlmtune.errors import DataError
from vlmtune.logging import get_logger

if TYPE_CHECKING:
    from vlmtune.families import Family

logger = get_logger("data")

__all__ = ["IGNORE_INDEX", "DataStats", "IndexedDataset", "build_dataset"]

_CHUNK = 1024  # rows per task of the parallel encoder
_PARALLEL_FROM = 4 * _CHUNK  # fewer rows are encoded in this process: starting workers would cost more


def build_dataset(
    sources: list[DataSource],
    cfg: DataConfig,
    encoder: Any,
    *,
    family: Family | None = None,
    seed: int,
    base_dir: Path | None = None,
    show_progress: bool = False,
    problems: list[dict] | None = None,
    max_pixels: int | None = None,
    workers: int | None = None,
) -> IndexedDataset:
    """Read, check, encode and mix `sources` into one dataset (training or evaluation alike).

    Args:
        sources: The sources, e.g. `recipe.data.train` or `recipe.data.eval`; relative image paths start from
            each source's `image_root` (default: the data file's folder).
        cfg: The policies: `max_length`, `on_overlength`, `on_bad_row`, `max_bad_fraction`, `train_on_prompt`,
            `cache`.
        encoder: A text model's fast tokenizer with a chat template, a VLM's processor (with `family`), or an
            `Encoder`.
        family: The vision-language family when `encoder` is a processor.
        seed: Seeds the subsets drawn for fractional weights, so every process builds the same dataset.
        base_dir: The recipe's folder; relative paths not found from the working directory are looked up here.
        show_progress: Draw progress bars (pass True on the main process only).
        problems: If given, every skipped, dropped or truncated row is appended as
            `{"where", "kind", "problem", "tokens"}` (for `vlmtune data-check`).
        max_pixels: Largest image accepted (default `images.DEFAULT_MAX_PIXELS`).
        workers: Processes that encode a large source (default: one per core this process may use).

    Returns:
        The examples: each source's whole copies and seeded subset, in source order, then file order.

    Raises:
        DataError: a missing or unreadable file, a bad or over-length row under `raise`, too many bad rows, or
            no example left.
        UserError: the tokenizer has no usable chat template.
    """
    if not sources:
        raise DataError("no data sources given; list at least one under data.train (or data.eval)")
    if not isinstance(encoder, Encoder):
        kwargs = {"max_pixels": max_pixels} if max_pixels else {}
        encoder = Encoder(encoder, family, train_on_prompt=cfg.train_on_prompt, **kwargs)
    workers = workers or len(os.sched_getaffinity(0))
    builder = _Builder(cfg, encoder, show_progress, problems, workers)
    parts: list[cache.Part] = []
    read_back: list[ReadBack] = []
    index: list[np.ndarray] = []
    offset = 0
    with datasets_progress(show_progress):
        for k, (spec, name) in enumerate(zip(sources, _names(sources), strict=True)):
            part, source = builder.encode_source(spec, base_dir)
            parts.append(part)
            read_back.append(source)
            taken = weigh(len(part), spec, name, k, seed=seed, stats=builder.stats)
            index.append(np.asarray(taken, dtype=np.int64) + offset)
            offset += len(part)
    check_bad_rows(builder.tracker, builder.stats)
    dataset = IndexedDataset(
        parts,
        np.concatenate(index) if index else np.zeros(0, dtype=np.int64),
        builder.stats,
        encoder=encoder,
        sources=read_back,
        on_bad_row=cfg.on_bad_row,
    )
    return summarise(dataset, sources)


def weigh(kept: int, source: DataSource, name: str, k: int, *, seed: int, stats: DataStats) -> list[int]:
    """The rows (of `kept`) of source number `k` that enter the dataset, by its weight; counted in `stats`."""
    taken = weighted_take(kept, source.weight, seed=seed, source_index=k)
    if kept and not len(taken):
        logger.warning("%s: weight %s × %d rows rounds to 0 rows; it adds nothing", name, source.weight, kept)
    stats.per_source[name] = len(taken)
    return taken


def check_bad_rows(tracker: BadRowTracker, stats: DataStats) -> None:
    """Record the skipped rows by kind, and stop if they exceed `data.max_bad_fraction`."""
    stats.skipped_bad = dict(tracker.counts.most_common())
    tracker.check_budget(stats.rows_read)


def summarise(dataset: IndexedDataset, sources: list[DataSource]) -> IndexedDataset:
    """Fill the dataset's token counts; an empty dataset is an error naming the sources."""
    stats = dataset.stats
    stats.rows_used = len(dataset)
    stats.total_tokens = int(sum(dataset.lengths))
    stats.trained_tokens = dataset.trained_tokens()
    if not dataset:
        raise DataError(f"no usable examples in {', '.join(s.path for s in sources)} ({stats.summary()})")
    return dataset


class _Builder:
    """Encodes the rows of each source into a `cache.Part`, applying the row policies (or takes it from the
    cache), and replays what happened to the rows into the stats, the bad-row budget and `problems`."""

    def __init__(
        self, cfg: DataConfig, encoder: Encoder, show_progress: bool, problems: list | None, workers: int
    ) -> None:
        self.cfg = cfg
        self.workers = workers
        self.encoder = encoder
        self.show_progress = show_progress
        self.problems = problems
        self.tracker = BadRowTracker(cfg.on_bad_row, cfg.max_bad_fraction)
        self.stats = DataStats()
        self._fingerprint = encoder.fingerprint() if cfg.cache else None

    def encode_source(self, spec: DataSource, base_dir: Path | None) -> tuple[cache.Part, ReadBack]:
        """The source's encoded part (built, or read from the cache) and how to read its rows back."""
        label = source_label(spec)
        path = locate(spec, base_dir)
        # A hub dataset is loaded to key the cache by its `datasets` fingerprint (its data files' versions).
        loaded = load_source(spec, base_dir=base_dir) if path is None and self._fingerprint else None
        key = self._cache_key(spec, path or loaded.rows._fingerprint) if self._fingerprint else None
        with cache.building(key):
            part = cache.load(key) if key else None
            if part is None:
                if loaded is None:
                    loaded = load_source(spec, base_dir=base_dir)
                part = self._encode(loaded, spec, source_image_root(spec, loaded, base_dir), key)
            else:
                logger.info("%s: encoded rows taken from the cache (%s)", label, cache.cache_root() / key)
        self.stats.rows_read += part.rows_read
        for entry in part.journal:
            self._apply(entry)
        images = self.encoder.vision and int(np.max(part.images, initial=0))
        if loaded is None and (images or spec.format == "prompt"):
            # Image rows read their images back from it, prompt rows their prompt and columns.
            loaded = load_source(spec, base_dir=base_dir)
        root = source_image_root(spec, loaded, base_dir) if loaded is not None else None
        return part, ReadBack(spec, loaded, root)

    def _cache_key(self, spec: DataSource, data: Path | str) -> str:
        cfg = self.cfg
        description = [
            source_label(spec), spec.format, spec.image_key, spec.image_root, spec.columns, spec.revision,
            [cfg.max_length, cfg.on_overlength, cfg.on_bad_row, cfg.train_on_prompt],
        ]  # fmt: skip
        return cache.source_key(data, description, self._fingerprint)

    def _encode(
        self, loaded: LoadedSource, spec: DataSource, image_root: Path | None, key: str | None
    ) -> cache.Part:
        """Encode every row of `loaded` (in parallel over the cores when it is large) into a written part."""
        work = _Work(self.encoder, loaded, spec, image_root, self.cfg)
        bounds = [(a, min(a + _CHUNK, len(loaded))) for a in range(0, len(loaded), _CHUNK)]
        workers = min(self.workers, len(bounds))
        writer = cache.PartWriter(key)
        rows_read, journal = 0, []
        bar = tqdm(
            total=len(loaded), desc=f"indexing {loaded.label}", unit="row", disable=not self.show_progress
        )
        try:
            parallel = workers if len(loaded) >= _PARALLEL_FROM and workers > 1 else 0
            with bar, _chunks(work, bounds, parallel) as chunks:
                for chunk in chunks:
                    self._check_fatal(chunk)  # a raise-policy row stops the build early, in file order
                    for row, encoded in zip(chunk.rows, chunk.encoded, strict=True):
                        _write(writer, row, encoded)
                    rows_read += chunk.rows_read
                    journal += chunk.journal
                    bar.update(chunk.rows_read)
        except BaseException:
            writer.discard()
            raise
        return writer.finish(rows_read, journal)

    def _check_fatal(self, chunk: _Chunk) -> None:
        for entry in chunk.journal:
            if entry[0] == "fatal":
                raise (ChatTemplateError if entry[1] == "template" else DataError)(entry[2])
            if entry[0] == "bad" and self.cfg.on_bad_row == "raise":
                self.tracker.handle(BadRow(entry[2], entry[3]), entry[1])  # raises, naming the row

    def _apply(self, entry: list) -> None:
        """Count (or raise on) one journal entry: after encoding, and again on a cache hit."""
        if entry[0] == "bad":
            _, where, kind, problem = entry
            self.tracker.handle(BadRow(kind, problem), where)
            self._note(where, kind, problem)
            return
        _, where, kind, problem, tokens = entry
        if kind == "truncated":
            self.stats.truncated += 1
        else:
            self.stats.dropped_overlength += 1
        self._note(where, kind, problem, tokens)

    def _note(self, where: str, kind: str, problem: str, tokens: int | None = None) -> None:
        if self.problems is not None:
            self.problems.append({"where": where, "kind": kind, "problem": problem, "tokens": tokens})


@dataclass
class _Chunk:
    """Encoded rows of one range of a source, as the parallel encoder returns them."""

    rows: list[int] = field(default_factory=list)
    encoded: list[EncodedRow | EncodedPair] = field(default_factory=list)
    journal: list[list] = field(default_factory=list)
    rows_read: int = 0


@dataclass
class _Work:
    """What encoding a source needs, shared with forked workers (set before the pool starts)."""

    encoder: Encoder
    loaded: LoadedSource
    spec: DataSource
    image_root: Path | None
    cfg: DataConfig

    def run(self, bounds: tuple[int, int]) -> _Chunk:
        """Encode rows `bounds[0]..bounds[1]-1`; problems become journal entries, never exceptions (a worker's
        exception would lose its type), so the parent applies the policies in file order."""
        chunk = _Chunk()
        loaded, spec, label = self.loaded, self.spec, self.loaded.label
        for i, row in enumerate(loaded.chunk(*bounds), start=bounds[0]):
            chunk.rows_read += 1
            try:
                if isinstance(row, Unparsable):
                    raise BadRow("unparsable", row.error)
                conversation = normalise(
                    row, spec.format, vision=self.encoder.vision, image_key=spec.image_key
                )
                encoded = self.encoder.encode(conversation, source=label, row=i, image_root=self.image_root)
            except BadRow as bad:
                chunk.journal.append(["bad", loaded.where(i), bad.kind, bad.problem])
                continue
            except ChatTemplateError as exc:
                chunk.journal.append(["fatal", "template", f"{loaded.where(i)}: {exc}"])
                return chunk
            except DataError as exc:
                chunk.journal.append(["fatal", "data", f"{loaded.where(i)}: {exc}"])
                return chunk
            if max(len(side.ids) for side in _sides(encoded)) > self.cfg.max_length:
                encoded = self._fit(encoded, loaded.where(i), chunk)
                if encoded is None:
                    continue
            chunk.rows.append(i)
            chunk.encoded.append(encoded)
        return chunk

    def _fit(
        self, row: EncodedRow | EncodedPair, where: str, chunk: _Chunk
    ) -> EncodedRow | EncodedPair | None:
        """Apply `on_overlength` to a row longer than `max_length` (a pair: its longer side); None drops it.
        Truncation cuts the end (each reply of a pair), never image tokens, nor leaves only prompt: such a row is
        dropped even under `truncate`, and so is a prompt row (its end is the question and the generation
        prompt)."""
        max_length = self.cfg.max_length
        sides = _sides(row)
        length = max(len(side.ids) for side in sides)
        expanded = " after image expansion" if sides[0].images else ""
        longer = " (the longer sequence of the pair)" if len(sides) > 1 else ""
        if self.cfg.on_overlength == "raise":
            chunk.journal.append(
                [
                    "fatal",
                    "data",
                    f"{where}: {length} tokens{expanded}{longer}, more than data.max_length={max_length}; set "
                    "data.on_overlength to drop or truncate such rows, or raise data.max_length",
                ]
            )
            return None
        through_image = any(side.last_image >= max_length for side in sides)
        if (
            self.cfg.on_overlength == "truncate"
            and not through_image
            and all(side.trained[:max_length].any() for side in sides)
        ):
            chunk.journal.append(
                ["note", where, "truncated", f"cut from {length}{longer} to {max_length} tokens", length]
            )
            cut = [
                EncodedRow(s.ids[:max_length], s.trained[:max_length], s.last_image, s.image_tokens, s.images)
                for s in sides
            ]
            return EncodedPair(*cut) if isinstance(row, EncodedPair) else cut[0]
        why = "truncating would cut through its image tokens" if through_image else ""
        problem = f"{length} tokens{expanded}{longer}, more than max_length {max_length}" + (
            f": {why}" if why else ""
        )
        chunk.journal.append(["note", where, "overlength", problem, length])
        return None


def _sides(encoded: EncodedRow | EncodedPair) -> tuple[EncodedRow, ...]:
    return encoded.sides() if isinstance(encoded, EncodedPair) else (encoded,)


def _write(writer: cache.PartWriter, row: int, encoded: EncodedRow | EncodedPair) -> None:
    """Index one kept row; a pair as its chosen sequence then its rejected one (`Part.splits`)."""
    if isinstance(encoded, EncodedRow):
        writer.add(row, encoded.ids, encoded.trained, encoded.images, encoded.image_tokens)
        return
    chosen, rejected = encoded.sides()
    writer.add(
        row,
        np.concatenate([chosen.ids, rejected.ids]),
        np.concatenate([chosen.trained, rejected.trained]),
        chosen.images,  # the row's images: both sides show them
        chosen.image_tokens + rejected.image_tokens,  # the vision tower's work: it runs on both
        split=len(chosen.ids),
    )


_WORK: _Work | None = None


@contextmanager
def _chunks(work: _Work, bounds: list[tuple[int, int]], workers: int) -> Iterator[Iterator[_Chunk]]:
    """The encoded chunks of `bounds`, in order: from a pool of `workers` forked processes, or from here (0)."""
    if not workers:
        yield (work.run(b) for b in bounds)
        return
    global _WORK
    _WORK = work  # forked workers inherit it: the encoder and the rows are not pickled
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # each worker tokenises on one core
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            yield pool.imap(_run_chunk, bounds)
    finally:
        _WORK = None


def _run_chunk(bounds: tuple[int, int]) -> _Chunk:
    assert _WORK is not None, "the parallel encoder's work is set before its pool starts"
    return _WORK.run(bounds)


def source_image_root(spec: DataSource, loaded: LoadedSource, base_dir: Path | None) -> Path | None:
    """Where relative image paths start: `image_root`, else the data file's folder (a dataset repository
    folder itself; nothing for a hub dataset: the working directory)."""
    if spec.image_root:
        return find_path(spec.image_root, base_dir)
    if not loaded.path.exists():
        return None
    return loaded.path if loaded.is_repository else loaded.path.parent


def _names(sources: Sequence[DataSource]) -> list[str]:
    """Each source's label, made unique so per-source counts do not merge."""
    names: list[str] = []
    for source in sources:
        base = source_label(source)
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base} (#{n})"
        names.append(name)
    return names
