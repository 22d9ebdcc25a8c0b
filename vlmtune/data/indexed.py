"""`IndexedDataset`: the examples of an index (`cache.Part`s), completed at read time from their source rows.

Token ids and label masks come from the memory-mapped index. An image-text row's vision inputs are made when the
row is read (in the DataLoader workers, as its micro-batch is collated), and a prompt row's prompt and columns
are read back from the source then too: the index never holds pixels or free-form fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmtune.config.schema import DataSource
from vlmtune.data import cache
from vlmtune.data.bad_rows import BadRow, bad_row_error
from vlmtune.data.encode import IGNORE_INDEX, Encoder
from vlmtune.data.formats import Pair, normalise
from vlmtune.data.prompt_formats import prompt_as_written, row_columns
from vlmtune.data.sources import LoadedSource, source_label
from vlmtune.data.stats import DataStats


class ReadBack:
    """One source as the dataset reads it back: its rows (Arrow, memory-mapped), format and image folder."""

    def __init__(self, spec: DataSource, loaded: LoadedSource | None, image_root: Path | None) -> None:
        self.spec, self.loaded, self.image_root = spec, loaded, image_root
        self.label = source_label(spec)


class IndexedDataset(torch.utils.data.Dataset):
    """Encoded examples: `{"input_ids": list[int], "labels": list[int]}`, labels -100 where not trained, plus an
    image-text row's vision inputs, decoded when the row is read.

    A preference row is `{"chosen": example, "rejected": example}`, each trained on its reply only. A prompt row
    is an example that trains nothing (it ends with the generation prompt), plus `"prompt"` (the row's prompt as
    written, image data left out) and `"columns"` (the row's other fields, read back from the source, and
    `image_sizes`: each image's `(width, height)` as the file is, `[]` without images).

    Labels are aligned with `input_ids` (not shifted; the model or the trainer shifts). A row whose image fails
    to decode is `{"bad_row": {"where", "kind", "problem"}}` under `data.on_bad_row: skip` (the collator leaves
    it out and counts it), and a `DataError` under `raise`.

    Attributes:
        stats: What the pipeline read, kept and dropped.
        lengths: Tokens per example (after image expansion; both sequences of a pair), e.g. for length-grouped
            batching.
    """

    def __init__(
        self,
        parts: list[cache.Part],
        index: np.ndarray,
        stats: DataStats | None = None,
        *,
        encoder: Encoder | None = None,
        sources: list[ReadBack] | None = None,
        on_bad_row: str = "raise",
    ) -> None:
        self._parts = parts
        self._starts = np.cumsum([0] + [len(p) for p in parts])
        self._index = np.asarray(index, dtype=np.int64)
        self.stats = stats if stats is not None else DataStats()
        self._encoder = encoder
        self._sources = sources or []
        self._on_bad_row = on_bad_row
        self.lengths: list[int] = self._gather(lambda p: p.lengths).tolist()

    def __len__(self) -> int:
        return len(self._index)

    def _locate(self, i: int) -> tuple[cache.Part, int, int]:
        row = int(self._index[i])
        k = int(np.searchsorted(self._starts, row, side="right")) - 1
        return self._parts[k], k, row - int(self._starts[k])

    def _gather(self, per_part) -> np.ndarray:
        """A per-row array of every part, taken at the dataset's examples (repeats included)."""
        if not self._parts:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.asarray(per_part(p), dtype=np.int64) for p in self._parts])[self._index]

    def __getitem__(self, i: int) -> dict[str, Any]:
        part, k, r = self._locate(i)
        start, end = part.offsets[r], part.offsets[r + 1]
        ids = np.asarray(part.tokens[start:end])
        trained = np.asarray(part.trained[start:end])
        split = int(part.splits[r])
        sides = (
            [(ids[:split], trained[:split]), (ids[split:], trained[split:])] if split else [(ids, trained)]
        )
        examples = [self._tokens(side_ids, side_trained) for side_ids, side_trained in sides]
        prompt_row = bool(self._sources) and self._sources[k].spec.format == "prompt"
        if part.images[r] or prompt_row:
            bad = self._read_back(k, int(part.rows[r]), examples, prompt_row)
            if bad is not None:
                return bad
        return {"chosen": examples[0], "rejected": examples[1]} if split else examples[0]

    def _tokens(self, ids: np.ndarray, trained: np.ndarray) -> dict[str, Any]:
        example: dict[str, Any] = {
            "input_ids": ids.tolist(),
            "labels": np.where(trained, ids, IGNORE_INDEX).tolist(),
        }
        family = self._encoder.family if self._encoder is not None else None
        if family is not None and family.token_type_ids == "prefix":
            # 0 is the bidirectional prefix: from the first trained token on, attention must be causal, or the
            # answer would see its own future. (PaliGemma's processor marks everything 0 without a `suffix`.)
            # A prompt row trains nothing: all of it is prefix, as it is when generating.
            first = int(np.argmax(trained)) if trained.any() else len(ids)
            example["token_type_ids"] = [0] * first + [1] * (len(ids) - first)
        return example

    def _read_back(
        self, k: int, row: int, examples: list[dict[str, Any]], prompt_row: bool
    ) -> dict[str, Any] | None:
        """Complete `examples` (one, or a pair's two) from the source row: the vision inputs of its images, and a
        prompt row's prompt and columns. Returns the bad row under `on_bad_row: skip`, else None."""
        source, encoder = self._sources[k], self._encoder
        where = source.loaded.where(row)
        raw = source.loaded.rows[row]
        located = {"source": source.label, "row": row, "image_root": source.image_root}
        try:
            read = normalise(raw, source.spec.format, vision=encoder.vision, image_key=source.spec.image_key)
            sides = read.sides() if isinstance(read, Pair) else (read,)
            for example, side in zip(examples, sides, strict=True):
                vision = encoder.vision_inputs(side, example["input_ids"], **located)
                example.update({key: v for key, v in vision.items() if key not in example})
            if prompt_row:
                examples[0]["prompt"] = prompt_as_written(raw["prompt"])
                columns = row_columns(raw, source.spec.image_key)
                columns["image_sizes"] = encoder.image_sizes(read, **located)
                examples[0]["columns"] = columns
        except BadRow as bad:
            if self._on_bad_row == "raise":
                raise bad_row_error(bad, where) from None
            return {"bad_row": {"where": where, "kind": bad.kind, "problem": bad.problem}}
        return None

    def image_examples(self) -> list[int]:
        """One example index per stored row with images (repeats of a row left out)."""
        _, first = np.unique(self._index, return_index=True)
        images = self.images()
        return sorted(int(i) for i in first if images[i])

    def trained_tokens(self) -> int:
        """Tokens with a label, over all examples (repeats counted)."""
        return int(self._gather(lambda p: p.trained_counts).sum())

    def image_tokens(self) -> np.ndarray:
        """Image tokens per example."""
        return self._gather(lambda p: p.image_tokens)

    def images(self) -> np.ndarray:
        """Images per example."""
        return self._gather(lambda p: p.images)
