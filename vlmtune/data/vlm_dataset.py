"""`build_vlm_dataset`: image-text sources in, one encoded, label-masked, weighted dataset out.

The image-text counterpart of `dataset.build_dataset`, with the same row policies (`on_bad_row`,
`on_overlength`, `max_length`, `train_on_prompt`, `max_bad_fraction`) and the same weighting. Rows hold the
processor's vision tensors, so each encoded row is kept as it is (a list of dicts); repeats from a weight above
1 are indices, not copies. A row is never truncated through its image tokens: such a row is dropped or raised.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vlmtune.config.schema import DataConfig, DataSource
from vlmtune.data.bad_rows import BadRow, BadRowTracker
from vlmtune.data.dataset import IGNORE_INDEX, _names, check_bad_rows, summarise, weigh
from vlmtune.data.sources import LoadedSource, Unparsable, datasets_progress, load_source, resolve_path
from vlmtune.data.stats import DataStats
from vlmtune.data.template import ChatTemplateError
from vlmtune.data.vlm_encode import Overlength, encode_vlm_row
from vlmtune.data.vlm_formats import normalise_vlm
from vlmtune.errors import DataError, UserError
from vlmtune.logging import get_logger
from vlmtune.model.families import Family

logger = get_logger("data")

VLM_FORMATS = ("messages", "sharegpt", "llava")


class VLMDataset(torch.utils.data.Dataset):
    """Encoded image-text rows (as `vlm_encode.encode_vlm_row` returns them), selected by an index.

    Attributes:
        stats: What the pipeline read, kept and dropped.
        lengths: Tokens per example after image expansion.
    """

    def __init__(self, rows: list[dict[str, Any]], index: list[int], stats: DataStats | None = None) -> None:
        self._rows = rows
        self._index = list(index)
        self.stats = stats if stats is not None else DataStats()
        self.lengths: list[int] = [rows[i]["length"] for i in self._index]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._rows[self._index[i]]

    def trained_tokens(self) -> int:
        """Tokens with a label, over all examples (repeats counted)."""
        return sum(sum(label != IGNORE_INDEX for label in self._rows[i]["labels"]) for i in self._index)


def build_vlm_dataset(
    sources: list[DataSource],
    cfg: DataConfig,
    processor: Any,
    family: Family,
    *,
    seed: int,
    base_dir: Path | None = None,
    show_progress: bool = False,
    problems: list[dict] | None = None,
) -> VLMDataset:
    """Read, check, encode and mix image-text `sources` into one dataset (training or evaluation alike).

    Args:
        sources: The sources, e.g. `recipe.data.train`; relative image paths start from each source's
            `image_root` (default: the data file's folder).
        cfg: The row policies, as for text.
        processor: The family's processor, with a chat template.
        family: The model family.
        seed: Seeds the subsets drawn for fractional weights.
        base_dir: The recipe's folder, for relative paths.
        show_progress: Draw progress bars (main process only).
        problems: If given, every skipped, dropped or truncated row is appended as
            `{"where", "kind", "problem", "tokens"}`.

    Raises:
        DataError: a missing file, a bad or over-length row under `raise`, too many bad rows, or no example left.
        UserError: a source's format has no image-text reading (`alpaca`).
    """
    if not sources:
        raise DataError("no data sources given; list at least one under data.train (or data.eval)")
    builder = _Builder(cfg, processor, family, show_progress, problems)
    index: list[int] = []
    with datasets_progress(show_progress):
        for k, (source, name) in enumerate(zip(sources, _names(sources), strict=True)):
            if source.format not in VLM_FORMATS:
                raise UserError(
                    f"data: {name}: format {source.format} is not an image-text format; a vision-language model "
                    f"reads {', '.join(VLM_FORMATS)}"
                )
            loaded = load_source(source, base_dir=base_dir)
            root = resolve_path(source.image_root, base_dir) if source.image_root else loaded.path.parent
            kept = builder.encode(loaded, source, root)
            index.extend(weigh(kept, source, name, k, seed=seed, stats=builder.stats))
    check_bad_rows(builder.tracker, builder.stats)
    return summarise(VLMDataset(builder.rows, index, builder.stats), sources)


class _Builder:
    """Encodes the rows of each source, applying the row policies."""

    def __init__(
        self, cfg: DataConfig, processor: Any, family: Family, show_progress: bool, problems: list | None
    ) -> None:
        self.cfg = cfg
        self.processor = processor
        self.family = family
        self.show_progress = show_progress
        self.problems = problems
        self.tracker = BadRowTracker(cfg.on_bad_row, cfg.max_bad_fraction)
        self.stats = DataStats()
        self.rows: list[dict[str, Any]] = []

    def encode(self, source: LoadedSource, spec: DataSource, image_root: Path) -> list[int]:
        """Encode every row of `source`; returns the storage ids of the rows kept, in file order."""
        kept = []
        rows = tqdm(
            source.rows,
            total=len(source),
            desc=f"encoding {source.label}",
            unit="row",
            disable=not self.show_progress,
        )
        for i, raw in enumerate(rows):
            self.stats.rows_read += 1
            where = source.where(i)
            try:
                if isinstance(raw, Unparsable):
                    raise BadRow("unparsable", raw.error)
                conversation = normalise_vlm(raw, spec.format, image_key=spec.image_key)
                encode = partial(
                    encode_vlm_row, self.processor, self.family, conversation.messages, conversation.images,
                    max_length=self.cfg.max_length, train_on_prompt=self.cfg.train_on_prompt,
                    source=str(source.label), row=i, image_root=image_root,
                )  # fmt: skip
                example = self._fit(encode, where)
            except BadRow as bad:
                self.tracker.handle(bad, where)
                self._note(where, bad.kind, bad.problem)
                continue
            except ChatTemplateError as exc:
                raise ChatTemplateError(f"{where}: {exc}") from None
            if example is None:
                continue
            kept.append(len(self.rows))
            self.rows.append(example)
        return kept

    def _fit(self, encode: Callable[..., dict[str, Any]], where: str) -> dict[str, Any] | None:
        """Encode the row and apply `on_overlength`; None drops it. Truncation never cuts image tokens, nor
        leaves only prompt: such a row is dropped even under `truncate`."""
        try:
            return encode(truncate=False)
        except Overlength as over:
            if self.cfg.on_overlength == "raise":
                raise DataError(
                    f"{where}: {over}; set data.on_overlength to drop (or truncate) such rows, or raise "
                    "data.max_length"
                ) from None
            if self.cfg.on_overlength == "truncate" and not over.cuts_images:
                try:
                    example = encode(truncate=True)
                except Overlength:
                    pass
                else:
                    self.stats.truncated += 1
                    self._note(
                        where, "truncated", f"cut from {over.length} to {over.max_length} tokens", over.length
                    )
                    return example
            self.stats.dropped_overlength += 1
            self._note(where, "overlength", str(over), over.length)
            return None

    def _note(self, where: str, kind: str, problem: str, tokens: int | None = None) -> None:
        if self.problems is not None:
            self.problems.append({"where": where, "kind": kind, "problem": problem, "tokens": tokens})
