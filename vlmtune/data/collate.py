"""Batching: right-padded tokens, plus an image-text batch's vision inputs batched the way its family needs.

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
