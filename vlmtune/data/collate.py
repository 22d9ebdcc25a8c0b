"""Batching: right-padded tokens, plus an image-text batch's vision inputs batched the way its family needs.

DPO and GRPO batch on top of this: `PairCollator` (a pair's two sequences in one batch) and `PromptCollator`
(left-padded prompts for generation, with their prompts and columns).

Rows come from `dataset.IndexedDataset`, one processor call each (at read time), so the vision inputs of a batch
are assembled here, by the family's `vision_batching` rules (`vlmtune.families`): one entry per image (or per
patch or tile) concatenated along dim 0, which the model matches to the image tokens in order (Qwen-VL's
flattened patches with `image_grid_thw`, LLaVA's images), or one entry per sample, `(batch, images, ...)`, where
a sample with fewer images is padded with all-zero images that the model recognises and skips (Idefics3 /
SmolVLM with `pixel_attention_mask`, Mllama).

A row whose image could not be decoded under `data.on_bad_row: skip` arrives as `{"bad_row": message}`: it is
left out of its micro-batch (the same one on every run and resume, since the data order is a pure function of
the seed and step) and counted in the batch's `bad_rows`. A micro-batch left with no row is one padding token
that trains nothing, so every rank still runs its forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vlmtune.data.encode import IGNORE_INDEX

if TYPE_CHECKING:
    from vlmtune.families import Family


class Collator:
    """Pads examples into `input_ids`, `attention_mask` and `labels` (-100 on padding), plus vision inputs.

    Args:
        pad_token_id: Id written into padded positions of `input_ids` (masked out by `attention_mask`).
        family: The vision-language family whose vision inputs to batch; None for a text model.
        pad_to_multiple_of: Round the batch length up to a multiple of this (tensor-core friendly shapes).
    """

    def __init__(
        self, pad_token_id: int | None, family: Family | None = None, pad_to_multiple_of: int | None = None
    ) -> None:
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: the tokenizer has no pad token; set one before batching")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.family = family
        self.pad_to_multiple_of = pad_to_multiple_of
        self.vision = dict(family.vision_batching) if family is not None else {}
        self.token_pad = dict(family.token_pad) if family is not None else {}

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Batch `examples`; vision keys only when some row has images; `bad_rows` counts rows left out."""
        if not examples:
            raise ValueError("cannot collate an empty batch")
        good = [e for e in examples if "bad_row" not in e]
        bad = len(examples) - len(good)
        if not good:
            good = [{"input_ids": [self.pad_token_id], "labels": [IGNORE_INDEX]}]
        batch = self._collate(good)
        if bad:
            batch["bad_rows"] = torch.tensor(bad)
        return batch

    def _collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": _pad_tokens(examples, "input_ids", length, self.pad_token_id),
            "attention_mask": _pad_tokens(examples, "attention_mask", length, 0),
            "labels": _pad_tokens(examples, "labels", length, IGNORE_INDEX),
        }
        keys = {k for e in examples for k in e} - set(batch)
        unknown = sorted(keys - set(self.token_pad) - set(self.vision))
        if unknown:
            name = self.family.name if self.family is not None else "text"
            raise ValueError(
                f"{name} rows hold {', '.join(unknown)}, which the collator does not know how to batch; add them "
                "to the family's vision_batching in vlmtune.families"
            )
        for key in sorted(keys & set(self.token_pad)):
            # A text-only row of a vision-language batch has no per-token outputs: it is all "not image".
            batch[key] = _pad_tokens(examples, key, length, self.token_pad[key], missing=self.token_pad[key])
        batch.update(self.vision_inputs(examples, length))
        return batch

    def vision_inputs(self, examples: list[dict[str, Any]], length: int) -> dict[str, torch.Tensor]:
        """The vision inputs of `examples` (rows of `length` tokens) batched by the family's rules; none when no
        row has an image (a text-only forward)."""
        batch: dict[str, torch.Tensor] = {}
        if not any(k in e for e in examples for k in self.vision if self.vision[k] != "count"):
            return batch
        for key, how in self.vision.items():
            values = [e.get(key) for e in examples]
            if all(v is None for v in values):
                continue
            if how == "cat":
                batch[key] = _cat(values)
            elif how == "sample":
                batch[key] = _sample(values)
            elif how == "count":
                batch[key] = torch.cat([torch.zeros(1, dtype=torch.long) if v is None else v for v in values])
            else:
                batch[key] = _sequence(values, length)
        return batch


class PairCollator(Collator):
    """DPO's batches: a micro-batch of B preference pairs is ONE padded batch of 2B rows, rows `[0, B)` the chosen
    sequences and `[B, 2B)` the rejected ones (each with its image: a pair's image is batched twice), plus
    `pairs`: B, so one forward scores both sides.

    Pairs whose image could not be decoded (under `on_bad_row: skip`) are left out and counted in `bad_rows`;
    when none is left, the batch is one pair of single padding tokens with `pairs` 0 (nothing to score, but
    every rank still runs its forward).
    """

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        good = [e for e in examples if "bad_row" not in e]
        missing = [i for i, e in enumerate(good) if not ("chosen" in e and "rejected" in e)]
        if missing:
            raise ValueError(
                f"example {missing[0]} is not a preference pair ({{'chosen', 'rejected'}}): method dpo reads "
                "data in format preference"
            )
        rows = [e["chosen"] for e in good] + [e["rejected"] for e in good]
        if not rows:
            rows = [{"input_ids": [self.pad_token_id], "labels": [IGNORE_INDEX]}] * 2
        batch = self._collate(rows)
        batch["pairs"] = torch.tensor(len(good))
        if len(good) < len(examples):
            batch["bad_rows"] = torch.tensor(len(examples) - len(good))
        return batch


class PromptCollator(Collator):
    """GRPO's batches: B prompts LEFT-padded (generation continues each row from its last token), labels all
    ignored, the vision inputs, and two entries that are not tensors: `prompts` (each row's prompt as written)
    and `columns` (each column name → its B values; a row without it gives None), which the method consumes
    on the host before the batch moves to the device.

    Prompts whose image could not be decoded are left out and counted in `bad_rows`; when none is left, the
    batch is one padding token with no prompt (`prompts` empty).
    """

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        good = [e for e in examples if "bad_row" not in e]
        if any("prompt" not in e for e in good):
            raise ValueError("an example has no 'prompt': method grpo reads data in format prompt")
        tokens = [{k: v for k, v in e.items() if k not in ("prompt", "columns")} for e in good]
        batch: dict[str, Any] = self._collate(
            tokens or [{"input_ids": [self.pad_token_id], "labels": [IGNORE_INDEX]}]
        )
        names = list(dict.fromkeys(name for e in good for name in e["columns"]))
        batch["prompts"] = [e["prompt"] for e in good]
        batch["columns"] = {name: [e["columns"].get(name) for e in good] for name in names}
        if len(good) < len(examples):
            batch["bad_rows"] = torch.tensor(len(examples) - len(good))
        return batch

    def _collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        # Padded on the right as SFT is, then each row turned so that its padding comes first.
        batch = super()._collate(examples)
        length = batch["input_ids"].shape[1]
        shifts = [length - len(e["input_ids"]) for e in examples]
        sequence = [key for key, how in self.vision.items() if how == "sequence"]
        for key in {"input_ids", "attention_mask", "labels", *self.token_pad, *sequence} & set(batch):
            batch[key] = torch.stack(
                [row.roll(shift, 0) for row, shift in zip(batch[key], shifts, strict=True)]
            )
        return batch


def _pad_tokens(
    examples: list[dict[str, Any]], key: str, length: int, pad: int, missing: int | None = None
) -> torch.Tensor:
    out = torch.full((len(examples), length), pad, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        values = example.get(key)
        if values is None:
            if key == "attention_mask":
                out[row, :n] = 1
                continue
            if missing is None:
                raise ValueError(f"example {row} has no {key!r} while others have")
            values = [missing] * n
        if len(values) != n:
            raise ValueError(f"example {row} has {n} input_ids but {len(values)} {key}")
        out[row, :n] = torch.as_tensor(values, dtype=torch.long)
    return out


def _pad_to(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad `tensor` at the end of every dim to `shape`."""
    pads: list[int] = []
    for have, want in zip(reversed(tensor.shape), reversed(shape), strict=True):
        pads += [0, want - have]
    if not any(pads):
        return tensor
    if tensor.dtype == torch.bool:
        return F.pad(tensor.to(torch.uint8), pads).bool()
    return F.pad(tensor, pads)


def _cat(values: list[torch.Tensor | None]) -> torch.Tensor:
    present = [v for v in values if v is not None]
    trailing = tuple(max(v.shape[d] for v in present) for d in range(1, present[0].dim()))
    return torch.cat([_pad_to(v, (v.shape[0], *trailing)) for v in present])


def _sample(values: list[torch.Tensor | None]) -> torch.Tensor:
    present = [v for v in values if v is not None]
    template = present[0]
    shape = tuple(max(v.shape[d] for v in present) for d in range(1, template.dim()))
    empty = torch.zeros((1, *shape), dtype=template.dtype)
    return torch.cat([empty if v is None else _pad_to(v, (1, *shape)) for v in values])


def _sequence(values: list[torch.Tensor | None], length: int) -> torch.Tensor:
    present = [v for v in values if v is not None]
    shape = (length, *(max(v.shape[d] for v in present) for d in range(1, present[0].dim())))
    return torch.stack(
        [torch.zeros(shape, dtype=present[0].dtype) if v is None else _pad_to(v, shape) for v in values]
    )
