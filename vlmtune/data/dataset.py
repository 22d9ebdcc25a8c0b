"""`build_dataset`: data sources in, one tokenised, label-masked, weighted dataset out.

Each source is read, every row normalised, checked and tokenised (bad and over-length rows handled by the
recipe's policies), and only then weighted, so a weight below 1 never hides a broken row from the checks.
Examples are stored once in flat arrays; repeats from a weight above 1 are indices, not copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vlmtune.config.schema import DataConfig, DataSource
from vlmtune.data import cache
from vlmtune.data.bad_rows import BadRow, BadRowTracker
from vlmtune.data.formats import normalise
from vlmtune.data.mixing import weighted_take
from vlmtune.data.sources import LoadedSource, Unparsable, datasets_progress, load_source, resolve_path
from vlmtune.data.stats import DataStats
from vlmtune.data.template import ChatTemplateError, check_tokenizer, tokenize_conversation
from vlmtune.errors import DataError
from vlmtune.logging import get_logger

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = get_logger("data")

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "DataStats", "TokenizedDataset", "build_dataset"]


class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenised examples: `{"input_ids": list[int], "labels": list[int]}`, labels -100 where not trained.

    Labels are aligned with `input_ids` (not shifted; the model or the trainer shifts).

    Attributes:
        stats: What the pipeline read, kept and dropped.
        lengths: Tokens per example, e.g. for length-grouped batching.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        trained: np.ndarray,
        offsets: np.ndarray,
        index: Sequence[int],
        stats: DataStats | None = None,
    ) -> None:
        self._tokens = tokens
        self._trained = trained
        self._offsets = offsets
        self._index = np.asarray(index, dtype=np.int64)
        self.stats = stats if stats is not None else DataStats()
        self.lengths: list[int] = (offsets[1:] - offsets[:-1])[self._index].tolist()

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        row = self._index[i]
        start, end = self._offsets[row], self._offsets[row + 1]
        ids = self._tokens[start:end]
        labels = np.where(self._trained[start:end], ids, IGNORE_INDEX)
        return {"input_ids": ids.tolist(), "labels": labels.tolist()}

    def trained_tokens(self) -> int:
        """Tokens with a label, over all examples (repeats counted)."""
        running = np.concatenate([[0], np.cumsum(self._trained, dtype=np.int64)])
        per_row = running[self._offsets[1:]] - running[self._offsets[:-1]]
        return int(per_row[self._index].sum())


def build_dataset(
    sources: list[DataSource],
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int,
    base_dir: Path | None = None,
    show_progress: bool = False,
    problems: list[dict] | None = None,
) -> TokenizedDataset:
    """Read, check, tokenise and mix `sources` into one dataset (training or evaluation alike).

    Args:
        sources: The sources, e.g. `recipe.data.train` or `recipe.data.eval`.
        cfg: The policies: `max_length`, `on_overlength`, `on_bad_row`, `max_bad_fraction`, `train_on_prompt`.
        tokenizer: A fast Hugging Face tokenizer with a chat template.
        seed: Seeds the subsets drawn for fractional weights, so every process builds the same dataset.
        base_dir: The recipe's folder; relative paths not found from the working directory are looked up here.
        show_progress: Draw progress bars (pass True on the main process only).
        problems: If given, every skipped, dropped or truncated row is appended as
            `{"where", "kind", "problem", "tokens"}` (for `vlmtune data-check`).

    Returns:
        The examples: each source's whole copies and seeded subset, in source order, then file order.

    Raises:
        DataError: a missing or unreadable file, a bad or over-length row under `raise`, too many bad rows, or
            no example left.
        UserError: the tokenizer has no usable chat template.
    """
    if not sources:
        raise DataError("no data sources given; list at least one under data.train (or data.eval)")
    check_tokenizer(tokenizer)
    builder = _Builder(cfg, tokenizer, show_progress, problems)
    index: list[int] = []
    with datasets_progress(show_progress):
        for k, (source, name) in enumerate(zip(sources, _names(sources), strict=True)):
            kept = builder.encode_source(source, base_dir)
            index.extend(weigh(kept, source, name, k, seed=seed, stats=builder.stats))
    check_bad_rows(builder.tracker, builder.stats)
    return summarise(TokenizedDataset(*builder.finish(), index=index, stats=builder.stats), sources)


def weigh(
    kept: list[int], source: DataSource, name: str, k: int, *, seed: int, stats: DataStats
) -> list[int]:
    """The rows of source number `k` that enter the dataset, by its weight; counted per source in `stats`."""
    taken = [kept[i] for i in weighted_take(len(kept), source.weight, seed=seed, source_index=k)]
    if kept and not taken:
        logger.warning(
            "%s: weight %s × %d rows rounds to 0 rows; it adds nothing", name, source.weight, len(kept)
        )
    stats.per_source[name] = len(taken)
    return taken


def check_bad_rows(tracker: BadRowTracker, stats: DataStats) -> None:
    """Record the skipped rows by kind, and stop if they exceed `data.max_bad_fraction`."""
    stats.skipped_bad = dict(tracker.counts.most_common())
    tracker.check_budget(stats.rows_read)


def summarise(dataset, sources: list[DataSource]):
    """Fill the dataset's token counts; an empty dataset is an error naming the sources."""
    stats = dataset.stats
    stats.rows_used = len(dataset)
    stats.total_tokens = sum(dataset.lengths)
    stats.trained_tokens = dataset.trained_tokens()
    if not dataset:
        raise DataError(f"no usable examples in {', '.join(s.path for s in sources)} ({stats.summary()})")
    return dataset


class _Builder:
    """Encodes the rows of each source into shared flat token storage, applying the row policies."""

    def __init__(
        self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, show_progress: bool, problems: list | None
    ) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.show_progress = show_progress
        self.problems = problems
        self.tracker = BadRowTracker(cfg.on_bad_row, cfg.max_bad_fraction)
        self.stats = DataStats()
        self._tok_fingerprint = cache.tokenizer_fingerprint(tokenizer)
        self._tokens: list[np.ndarray] = []
        self._trained: list[np.ndarray] = []

    def encode_source(self, source: DataSource, base_dir: Path | None) -> list[int]:
        """Encode one source (or take it from the tokenisation cache); returns the storage ids of the rows kept."""
        key = self._cache_key(source, base_dir)
        encoded = cache.load(key) if key else None
        if encoded is None:
            encoded = self.encode(load_source(source, base_dir=base_dir), source.format)
            if key:
                cache.save(key, encoded)
        else:
            logger.info("%s: tokenised rows taken from the cache (%s)", source.path, cache.cache_root() / key)
            self.stats.rows_read += encoded.rows_read
            for entry in encoded.journal:
                self._apply(entry)
        kept = list(range(len(self._tokens), len(self._tokens) + len(encoded.tokens)))
        self._tokens += encoded.tokens
        self._trained += encoded.trained
        return kept

    def _cache_key(self, source: DataSource, base_dir: Path | None) -> str | None:
        if not self.cfg.cache or self._tok_fingerprint is None:
            return None
        label = f"{source.path}[{source.split}]" if source.split else source.path
        path = resolve_path(source.path, base_dir)
        return cache.source_key(path, label, source.format, self._tok_fingerprint, self.cfg)

    def encode(self, source: LoadedSource, fmt: str) -> cache.Encoded:
        """Encode every row of `source`, applying the row policies as it goes; returns the kept rows and journal."""
        out = cache.Encoded()
        rows = tqdm(
            source.rows,
            total=len(source),
            desc=f"tokenising {source.label}",
            unit="row",
            disable=not self.show_progress,
        )
        for i, row in enumerate(rows):
            self.stats.rows_read += 1
            out.rows_read += 1
            try:
                ids, trained = self._encode_row(row, fmt)
            except BadRow as bad:
                out.journal.append(["bad", source.where(i), bad.kind, bad.problem])
                self._apply(out.journal[-1])
                continue
            except ChatTemplateError as exc:
                raise ChatTemplateError(f"{source.where(i)}: {exc}") from None
            if len(ids) > self.cfg.max_length:
                fitted, entry = self._fit(ids, trained, source.where(i))
                out.journal.append(entry)
                self._apply(entry)
                if fitted is None:
                    continue
                ids, trained = fitted
            # int32 halves the memory of int64 and holds every real vocabulary.
            out.tokens.append(np.asarray(ids, dtype=np.int32))
            out.trained.append(np.asarray(trained, dtype=bool))
        return out

    def _apply(self, entry: list) -> None:
        """Count (or raise on) one journal entry: live while encoding, and again on a cache hit."""
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

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The flat token ids, the flat trained mask, and each row's start offset (plus the end)."""
        lengths = np.array([len(t) for t in self._tokens], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.concatenate(self._tokens) if self._tokens else np.zeros(0, dtype=np.int32)
        trained = np.concatenate(self._trained) if self._trained else np.zeros(0, dtype=bool)
        return tokens, trained, offsets

    def _encode_row(self, row: Any, fmt: str) -> tuple[list[int], list[bool]]:
        if isinstance(row, Unparsable):
            raise BadRow("unparsable", row.error)
        messages = normalise(row, fmt)
        ids, trained = tokenize_conversation(
            self.tokenizer, messages, train_on_prompt=self.cfg.train_on_prompt
        )
        if not any(trained):
            raise BadRow(
                "no_trained_tokens",
                "no token of the rendered conversation falls in an assistant reply, so there is nothing to train; "
                "check that the chat template renders assistant messages",
            )
        return ids, trained

    def _fit(self, ids: list[int], trained: list[bool], where: str) -> tuple[tuple | None, list]:
        """Apply `on_overlength` to a row longer than `max_length`: the kept row (None: dropped) and its entry."""
        max_length = self.cfg.max_length
        if self.cfg.on_overlength == "raise":
            raise DataError(
                f"{where}: {len(ids)} tokens, more than data.max_length={max_length}; set data.on_overlength "
                "to drop or truncate such rows, or raise data.max_length"
            )
        if self.cfg.on_overlength == "truncate" and any(trained[:max_length]):
            entry = ["note", where, "truncated", f"cut from {len(ids)} to {max_length} tokens", len(ids)]
            return (ids[:max_length], trained[:max_length]), entry
        # Dropped outright, or truncation would leave only prompt: nothing to learn from.
        return None, [
            "note",
            where,
            "overlength",
            f"{len(ids)} tokens, more than max_length {max_length}",
            len(ids),
        ]

    def _note(self, where: str, kind: str, problem: str, tokens: int | None = None) -> None:
        if self.problems is not None:
            self.problems.append({"where": where, "kind": kind, "problem": problem, "tokens": tokens})


def _names(sources: list[DataSource]) -> list[str]:
    """Each source's path as given (with its split), made unique so per-source counts do not merge."""
    names: list[str] = []
    for source in sources:
        base = f"{source.path}[{source.split}]" if source.split else source.path
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base} (#{n})"
        names.append(name)
    return names
