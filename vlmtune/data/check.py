"""`vlmtune data-check`: scan all of a recipe's data before training and say what training would do with it.

Every row is read and tokenised with the recipe's tokenizer and template, whatever the recipe's policies, so one
bad row does not hide the next, and every image is decoded (in parallel: finding every broken file is this
command's job; training only reads image headers before it starts): problems are counted per kind, written one per line to a JSONL file, and token
lengths are summarised as a histogram. The verdict then applies the recipe's own policies (`on_bad_row`,
`max_bad_fraction`, `on_overlength`): it fails exactly when training would stop on this data.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from vlmtune.config.schema import Recipe
from vlmtune.data.dataset import IndexedDataset, build_dataset
from vlmtune.data.encode import IGNORE_INDEX
from vlmtune.errors import DataError

_BAR = 40  # characters of the longest histogram bar


@dataclass
class SplitReport:
    name: str
    dataset: IndexedDataset | None
    problems: list[dict] = field(default_factory=list)
    error: str | None = None  # a problem that stops even the scan (missing file, no examples)

    @property
    def rows_read(self) -> int:
        return self.dataset.stats.rows_read if self.dataset else 0

    def counts(self) -> Counter:
        return Counter(p["kind"] for p in self.problems)


def scan(recipe: Recipe, tokenizer, *, family=None, show_progress: bool = True) -> list[SplitReport]:
    """Read and tokenise every train and eval row, collecting problems instead of stopping at the first.

    For a vision-language model (`family` given, `tokenizer` its processor) lengths are the model's real sequence
    lengths, and every image is decoded and run through the processor.
    """
    # Scan everything: skip bad rows, drop rows that would raise for length; the verdict applies the real policies.
    on_overlength = "drop" if recipe.data.on_overlength == "raise" else recipe.data.on_overlength
    lenient = recipe.data.model_copy(
        update={"on_bad_row": "skip", "max_bad_fraction": 1.0, "on_overlength": on_overlength}
    )
    reports = []
    for name, sources in (("train", recipe.data.train), ("eval", recipe.data.eval)):
        if not sources:
            continue
        report = SplitReport(name, None)
        kwargs = {
            "seed": recipe.train.seed, "base_dir": recipe._base_dir, "show_progress": show_progress,
            "problems": report.problems,
        }  # fmt: skip
        try:
            report.dataset = build_dataset(sources, lenient, tokenizer, family=family, **kwargs)
            report.problems += decode_images(report.dataset, show_progress=show_progress)
        except DataError as exc:
            report.error = str(exc)
        reports.append(report)
    return reports


_DATASET: IndexedDataset | None = None


def _read(i: int) -> dict | None:
    assert _DATASET is not None
    return _DATASET[i].get("bad_row")


def decode_images(dataset: IndexedDataset, *, show_progress: bool = True) -> list[dict]:
    """Decode every image of the dataset as training would, in parallel over the cores: the problems found."""
    global _DATASET
    todo = dataset.image_examples()
    if not todo:
        return []
    _DATASET = dataset  # forked workers inherit it
    bar = tqdm(total=len(todo), desc="decoding images", unit="row", disable=not show_progress)
    try:
        with bar, multiprocessing.get_context("fork").Pool(len(os.sched_getaffinity(0))) as pool:
            found = []
            for bad in pool.imap(_read, todo, chunksize=16):
                bar.update(1)
                if bad is not None:
                    found.append({**bad, "tokens": None})
            return found
    finally:
        _DATASET = None


def verdict(recipe: Recipe, reports: list[SplitReport]) -> list[str]:
    """Why training would stop on this data (empty: it would not)."""
    d, failures = recipe.data, []
    for r in reports:
        if r.error:
            failures.append(f"{r.name}: {r.error}")
            continue
        counts = r.counts()
        bad = sum(n for kind, n in counts.items() if kind not in ("overlength", "truncated"))
        first_bad = next((p for p in r.problems if p["kind"] not in ("overlength", "truncated")), None)
        if bad and d.on_bad_row == "raise":
            failures.append(
                f"{r.name}: {bad} bad row(s) and data.on_bad_row is raise: training stops at the first "
                f"({first_bad['where']}: {first_bad['problem']}); fix them or set data.on_bad_row: skip"
            )
        elif bad and bad / max(r.rows_read, 1) > d.max_bad_fraction:
            failures.append(
                f"{r.name}: {bad} of {r.rows_read} rows are bad ({bad / r.rows_read:.1%}), more than "
                f"data.max_bad_fraction={d.max_bad_fraction}"
            )
        if counts["overlength"] and d.on_overlength == "raise":
            failures.append(
                f"{r.name}: {counts['overlength']} row(s) longer than data.max_length={d.max_length} and "
                "data.on_overlength is raise; set it to drop or truncate, or raise max_length"
            )
    return failures


def write_problems(reports: list[SplitReport], path: Path) -> int:
    """All problem rows, one JSON object per line (with the split); returns how many."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w") as f:
        for r in reports:
            for p in r.problems:
                f.write(json.dumps({"split": r.name, **p}) + "\n")
                n += 1
    return n


def format_report(recipe: Recipe, reports: list[SplitReport]) -> str:
    lines = []
    for r in reports:
        if r.error:
            lines.append(f"{r.name}: cannot be used: {r.error}")
            continue
        s = r.dataset.stats
        lines.append(f"{r.name}: {s.rows_read:,} rows read → {s.rows_used:,} examples")
        counts = r.counts()
        if counts:
            kinds = ", ".join(f"{kind}: {n:,}" for kind, n in counts.most_common())
            lines.append(f"  problems: {kinds}")
        share = s.trained_tokens / s.total_tokens if s.total_tokens else 0.0
        lines.append(f"  tokens: {s.total_tokens:,}, trained {s.trained_tokens:,} ({share:.1%})")
        lengths = r.dataset.lengths + [p["tokens"] for p in r.problems if p["kind"] == "overlength"]
        lines += _histogram(lengths, recipe.data.max_length)
    return "\n".join(lines)


def _histogram(lengths: list[int], max_length: int) -> list[str]:
    """Token lengths in power-of-two bins, with the bins past max_length flagged."""
    if not lengths:
        return []
    arr = np.asarray(lengths)
    q = np.percentile(arr, [50, 95, 99])
    out = [f"  length: min {arr.min()}, median {q[0]:.0f}, p95 {q[1]:.0f}, p99 {q[2]:.0f}, max {arr.max()}"]
    top = 2 ** math.ceil(math.log2(max(int(arr.max()), 2)))
    edges = [0] + [2**k for k in range(4, int(math.log2(top)) + 1)]
    counts = np.histogram(arr, bins=[*edges[:-1], edges[-1] + 1])[0]
    peak = max(int(counts.max()), 1)
    for lo, hi, n in zip(edges[:-1], edges[1:], counts, strict=True):
        flag = "  > max_length" if lo >= max_length else ""
        bar = "█" * max(round(_BAR * int(n) / peak), 1 if n else 0)
        out.append(f"  {lo:>7,}–{hi:<7,} {bar:<{_BAR}} {int(n):,}{flag}")
    return out


def render_example(
    example: dict, tokenizer, *, image_ids: set[int] = frozenset(), color: bool | None = None
) -> str:
    """An example's text with the trained tokens marked (green on a terminal, ⟦…⟧ elsewhere) and each run of
    image tokens shown as one `[N image tokens]`; a preference pair as its two sequences, a prompt row with its
    columns."""
    if "bad_row" in example:
        bad = example["bad_row"]
        return f"(left out: {bad['where']}: {bad['problem']})"
    if "chosen" in example:
        return "\n".join(
            f"[{side}] {render_example(example[side], tokenizer, image_ids=image_ids, color=color)}"
            for side in ("chosen", "rejected")
        )
    if "columns" in example:
        tokens = {k: v for k, v in example.items() if k not in ("prompt", "columns")}
        shown = render_example(tokens, tokenizer, image_ids=image_ids, color=color)
        return f"{shown}\n[columns] {json.dumps(example['columns'], default=str)}"
    color = sys.stdout.isatty() if color is None else color
    start, end = ("\033[32m", "\033[0m") if color else ("⟦", "⟧")
    ids, labels = example["input_ids"], example["labels"]
    kinds = [
        "image" if t in image_ids else "trained" if lab != IGNORE_INDEX else "prompt"
        for t, lab in zip(ids, labels, strict=True)
    ]
    pieces, i = [], 0
    while i < len(ids):
        j = i
        while j < len(ids) and kinds[j] == kinds[i]:
            j += 1
        if kinds[i] == "image":
            pieces.append(f"[{j - i} image tokens]")
        else:
            text = tokenizer.decode(ids[i:j], skip_special_tokens=False)
            pieces.append(f"{start}{text}{end}" if kinds[i] == "trained" else text)
        i = j
    return "".join(pieces)
