"""Padding-free and packed batches: several sequences share a row, kept apart by `position_ids`.

A batch here has no `attention_mask`. Each sequence's `position_ids` restart at 0, and transformers (5.x,
`masking_utils.find_packed_sequence_indices`) turns every restart into a sequence boundary: the sdpa and eager
masks become block-diagonal causal, and flash-attention gets per-sequence lengths. Whether a loaded model really
does this is checked once per run by `check_packed_attention`, not assumed.

The loss shifts labels by one within a row, so the last token of one sequence would be trained to predict the
first token of the next. The first label of every sequence is therefore -100; in a padded batch that label is
never used either (nothing precedes it), so the trained tokens, and the loss, are the same as padded batching.

Image-text rows (a vision-language family's `Collator` given as `vision`): the vision inputs of every example of
the batch are batched together by the family's rules in the order of their placeholders, which is the order the
model fills image tokens in; per-token outputs (`mm_token_type_ids`, `token_type_ids`) are laid end to end like
`input_ids`. Families with multimodal rope (Qwen-VL) get each example's own 3-D positions from `rope`
(`positions.RopeIndex`), as `(4, rows, tokens)` position ids: the 1-D positions first (the boundaries), then the
three rope axes. Families whose model cannot keep packed examples apart say why in `Family.packing_refused`.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

import torch

from vlmtune.data.collate import Collator, _cat, _pad_to
from vlmtune.data.encode import IGNORE_INDEX
from vlmtune.errors import UserError


def best_fit_decreasing(lengths: Sequence[int], capacity: int, *, seed: int) -> list[list[int]]:
    """Pack items (by index) into as few bins of at most `capacity` tokens as best-fit decreasing finds.

    Longest items go first, each into the fullest bin that still has room. Equal lengths are ordered by a
    seeded permutation, so the bins are a pure function of (lengths, capacity, seed). The number of bins
    depends on the lengths only, so steps per epoch are known before training.

    Raises:
        ValueError: an item longer than `capacity`.
    """
    if lengths and max(lengths) > capacity:
        raise ValueError(f"an item of {max(lengths)} tokens does not fit a bin of {capacity}")
    tie = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], tie[i]))
    bins: list[list[int]] = []
    # Bins by free space; `spaces` lists the free-space values that have a bin, sorted. There are at most
    # `capacity` distinct values, so each step costs a bisect and a short list insert however many rows.
    by_space: dict[int, list[int]] = {}
    spaces: list[int] = []
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(spaces, n)
        if k == len(spaces):
            bins.append([i])
            b, free = len(bins) - 1, capacity - n
        else:
            space = spaces[k]
            b = by_space[space].pop()
            if not by_space[space]:
                del by_space[space]
                spaces.pop(k)
            bins[b].append(i)
            free = space - n
        if free > 0:
            if free not in by_space:
                by_space[free] = []
                bisect.insort(spaces, free)
            by_space[free].append(b)
    return bins


def budget_chunks(lengths: Sequence[int], budget: int, *, seed: int) -> list[list[int]]:
    """Split items into padded batches of at most `budget` tokens including padding (rows × longest row).

    Items are sorted by length (ties by a seeded permutation) and cut greedily, so each chunk holds rows of
    similar length: little padding, and the chunks are a pure function of (lengths, budget, seed).
    """
    if lengths and max(lengths) > budget:
        raise ValueError(f"an item of {max(lengths)} tokens does not fit a budget of {budget}")
    tie = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], tie[i]))
    chunks: list[list[int]] = []
    for i in order:
        # Descending order: the chunk's first row is its longest.
        if chunks and (len(chunks[-1]) + 1) * lengths[chunks[-1][0]] <= budget:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def _segment(example: dict) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.as_tensor(example["input_ids"], dtype=torch.long)
    labels = torch.as_tensor(example["labels"], dtype=torch.long).clone()
    if len(labels) != len(ids):
        raise ValueError(f"an example has {len(ids)} input_ids but {len(labels)} labels")
    labels[0] = IGNORE_INDEX  # never predicted from the previous sequence's last token
    return ids, labels


def _merge_vision(examples: list[dict], vision: dict[str, str]) -> dict:
    """The vision inputs of one packed row's examples, merged as if they were one example with all the images,
    in the order of their placeholders: per-image entries concatenated (`cat`, `count`), per-sample ones
    (`sample`: (1, images, ...)) joined along the image dim."""
    merged = {}
    for key, how in vision.items():
        values = [e.get(key) for e in examples]
        present = [v for v in values if v is not None]
        if how == "count":
            if present:
                merged[key] = torch.cat(
                    [torch.zeros(1, dtype=torch.long) if v is None else v for v in values]
                )
        elif not present:
            continue
        elif how == "cat":
            merged[key] = _cat(present)
        elif how == "sample":
            trailing = tuple(max(v.shape[d] for v in present) for d in range(2, present[0].dim()))
            merged[key] = torch.cat([_pad_to(v, (1, v.shape[1], *trailing)) for v in present], dim=1)
        else:  # refused up front by `Family.packing_refused` (Mllama's cross-attention mask)
            raise ValueError(f"{key}: {how} vision inputs cannot be packed")
    return merged


class _Packer:
    """Lays examples end to end in rows, right-pads the rows, and batches their vision inputs.

    Args:
        pad_token_id: Written into padding (only packed rows of different lengths, or a row left empty).
        vision: The padded collator of a vision-language family (its `vision` / `token_pad` rules); None for text.
        rope: Per-example 3-D rope positions (`positions.RopeIndex`) for families with multimodal rope.
    """

    def __init__(self, pad_token_id: int | None, vision: Collator | None = None, rope=None) -> None:
        self.pad_token_id = pad_token_id
        self.vision = vision
        self.rope = rope

    def __call__(self, rows: list[list[dict]]) -> dict[str, torch.Tensor]:
        bad = sum("bad_row" in e for row in rows for e in row)
        rows = [[e for e in row if "bad_row" not in e] for row in rows]
        if not all(rows):
            # Rows whose images could not be decoded (data.on_bad_row: skip) were left out; an empty row still
            # runs a forward of one token that trains nothing, so every rank keeps in step.
            empty = {"input_ids": [self.pad_token_id or 0], "labels": [IGNORE_INDEX]}
            rows = [row or [empty] for row in rows]
        token_keys = sorted({k for row in rows for e in row for k in e} & set(self._token_pad))
        parts = [[_segment(e) for e in row] for row in rows]
        lengths = [sum(len(p[0]) for p in row) for row in parts]
        length = max(lengths)
        input_ids = torch.full((len(rows), length), self.pad_token_id or 0, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        # Padding is a sequence of its own (positions from 0): real tokens never attend to it.
        positions = torch.arange(length).repeat(len(rows), 1)
        rope = torch.arange(length).repeat(3, len(rows), 1) if self.rope is not None else None
        tokens = {
            k: torch.full((len(rows), length), self._token_pad[k], dtype=torch.long) for k in token_keys
        }
        for r, (row, part, n) in enumerate(zip(rows, parts, lengths, strict=True)):
            input_ids[r, :n] = torch.cat([p[0] for p in part])
            labels[r, :n] = torch.cat([p[1] for p in part])
            positions[r, :n] = torch.cat([torch.arange(len(p[0])) for p in part])
            positions[r, n:] = torch.arange(length - n)
            if rope is not None:
                rope[:, r, :n] = torch.cat([self.rope(e) for e in row], dim=1)
                rope[:, r, n:] = torch.arange(length - n)
            for k in token_keys:
                pad = self._token_pad[k]
                tokens[k][r, :n] = torch.cat(
                    [torch.as_tensor(e[k] if k in e else [pad] * len(e["input_ids"])) for e in row]
                )
        batch = {
            "input_ids": input_ids,
            "position_ids": positions if rope is None else torch.cat([positions[None], rope]),
            "labels": labels,
            "n_tokens": torch.tensor(sum(lengths)),
            **tokens,
        }
        if self.vision is not None:
            merged = [_merge_vision(row, self.vision.vision) for row in rows]
            batch.update(self.vision.vision_inputs(merged, length))
        if bad:
            batch["bad_rows"] = torch.tensor(bad)
        return batch

    @property
    def _token_pad(self) -> dict[str, int]:
        return self.vision.token_pad if self.vision is not None else {}


class PaddingFreeCollator(_Packer):
    """Concatenates a micro-batch's examples into one row: no pad tokens, positions restarting per example.

    Args as `_Packer`; a text model needs none of them.
    """

    def __init__(self, pad_token_id: int | None = None, vision: Collator | None = None, rope=None) -> None:
        super().__init__(pad_token_id, vision, rope)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        return super().__call__([examples])


class PackedCollator(_Packer):
    """One row per bin (a list of examples); rows right-padded to the longest bin.

    Padding forms its own dummy sequence (positions from 0, labels -100): real tokens never attend to it, since
    it comes after them in a causal mask and is a separate sequence anyway.
    """

    def __init__(self, pad_token_id: int | None, vision: Collator | None = None, rope=None) -> None:
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: the tokenizer has no pad token; set one before batching")
        super().__init__(pad_token_id, vision, rope)

    def __call__(self, bins: list[list[dict]]) -> dict[str, torch.Tensor]:
        if not bins or not all(bins):
            raise ValueError("cannot collate an empty batch or an empty bin")
        return super().__call__(bins)


class OneRowPackedCollator(PaddingFreeCollator):
    """Packed bins laid end to end in a single row: flash-attention reads sequence boundaries from
    `position_ids` only in a batch of one row (transformers' `_is_packed_sequence`), and with its
    variable-length kernel a long row costs no more than several short ones."""

    def __call__(self, bins: list[list[dict]]) -> dict[str, torch.Tensor]:
        return super().__call__([example for b in bins for example in b])


def _segments(position_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every sequence, row-major, as the position restarts delimit them."""
    out = []
    for r, row in enumerate(position_ids.tolist()):
        starts = [k for k, p in enumerate(row) if p == 0] + [len(row)]
        out += [(r, a, b) for a, b in itertools.pairwise(starts)]
    return out


@torch.no_grad()
def check_packed_attention(model: torch.nn.Module, collator, vocab_size: int, device, batching: str) -> None:
    """Refuse a model that lets packed sequences attend to each other, as batched by this run's `collator`.

    Three different sequences are collated as training would collate them (bins [[A, B], [C]] when packed) and
    each is also run on its own: with working block-diagonal attention the logits are the same both ways. Models
    whose attention ignores `position_ids` boundaries (no packed-sequence support in their mask code, a cache
    left on, flash-attention given several rows) fail here, before training.

    Raises:
        UserError: the model mixes the sequences (or does not take `position_ids`).
    """
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, max(vocab_size, 4), (n,), generator=g).tolist() for n in (11, 7, 9)]
    examples = [{"input_ids": ids, "labels": ids} for ids in seqs]
    batch = collator([examples[:2], examples[2:]]) if batching == "packed" else collator(examples)
    was_training = model.training
    model.eval()
    try:
        inputs = {k: batch[k].to(device) for k in ("input_ids", "position_ids")}
        packed = model(**inputs, use_cache=False).logits.float()
        alone = [
            model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0].float()
            for ids in seqs
        ]
    except TypeError as exc:
        raise UserError(
            f"data.batching: {batching} needs a model that takes position_ids ({exc}); use data.batching: padded"
        ) from None
    finally:
        model.train(was_training)
    err = 0.0
    for (r, a, b), ref in zip(_segments(batch["position_ids"]), alone, strict=False):
        # Mixed sequences differ by the order of the logits themselves (~1.4 of the largest logit on the tiny
        # Llama); a working mask only by rounding (6e-7 in fp32, 8e-3 under bf16 autocast).
        err = max(err, float((packed[r, a:b] - ref).abs().max() / ref.abs().max().clamp_min(1e-6)))
    if err > 0.1:
        raise UserError(
            f"data.batching: {batching}: this model's attention ({type(model).__name__}) lets packed sequences "
            f"attend to each other (relative logit difference {err:.2g} against each sequence alone), so "
            "training would mix examples; use data.batching: padded, or model.attn_implementation sdpa / "
            "flash_attention_2 with a model whose masks follow position_ids"
        )
