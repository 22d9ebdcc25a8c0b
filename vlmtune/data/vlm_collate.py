"""Batching of encoded image-text rows: right-padded text plus each family's vision inputs, batched its way.

Rows come from `vlm_encode.encode_vlm_row`, one processor call each, so the vision inputs of a batch are
assembled here. Families batch them in two ways: one entry per image (or per patch or tile) concatenated along
dim 0, which the model matches to the image tokens in order (Qwen-VL's flattened patches with `image_grid_thw`,
LLaVA's images), or one entry per sample, `(batch, images, ...)`, where a sample with fewer images is padded with
all-zero images that the model recognises and skips (Idefics3 / SmolVLM with `pixel_attention_mask`, Mllama).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vlmtune.data.dataset import IGNORE_INDEX

if TYPE_CHECKING:
    from vlmtune.model.families import Family

# Per family, how each vision input of the processor is batched (facts to move into `families.py`):
#   cat:      concatenated along dim 0; trailing dims zero-padded to the largest (LLaVA-NeXT / OneVision tiles
#             per image differ with the image's aspect ratio; the model reads the real count from image_sizes).
#   sample:   (1, images, ...) per row; every dim after the first zero-padded to the largest, a row without
#             images gets zeros, then concatenated: (batch, max images, ...).
#   count:    one number per row (images in the row); a row without images counts 0.
#   sequence: (seq, images, tiles) per row (Mllama's cross_attention_mask), padded like `sample` and along the
#             sequence to the batch length; zeros mean "attends to no image".
_CAT, _SAMPLE, _COUNT, _SEQUENCE = "cat", "sample", "count", "sequence"
_QWEN = {"pixel_values": _CAT, "image_grid_thw": _CAT}
_IDEFICS = {"pixel_values": _SAMPLE, "pixel_attention_mask": _SAMPLE}
VISION_BATCHING: dict[str, dict[str, str]] = {
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "qwen3_vl": _QWEN,
    "llava": {"pixel_values": _CAT},
    "llava_next": {"pixel_values": _CAT, "image_sizes": _CAT},
    "llava_onevision": {"pixel_values": _CAT, "image_sizes": _CAT, "batch_num_images": _COUNT},
    "idefics3": _IDEFICS,
    "smolvlm": _IDEFICS,
    "paligemma": {"pixel_values": _CAT},
    "gemma3": {"pixel_values": _CAT},
    "mllama": {
        "pixel_values": _SAMPLE,
        "aspect_ratio_ids": _SAMPLE,
        "aspect_ratio_mask": _SAMPLE,
        "cross_attention_mask": _SEQUENCE,
    },
    "internvl": {"pixel_values": _CAT},
}

# Per-token outputs besides input_ids / attention_mask / labels, and the value padding takes. PaliGemma's
# token_type_ids 0 mark the bidirectional prefix, so padding (after the answer) is 1, the causal part.
_TOKEN_PAD = {"token_type_ids": 0, "mm_token_type_ids": 0}
_TOKEN_PAD_BY_FAMILY = {"paligemma": {"token_type_ids": 1}}
_NOT_BATCHED = ("length",)


class VLMCollator:
    """Pads encoded rows into one batch and batches their vision inputs as `family` needs.

    Args:
        pad_token_id: Id written into padded positions of `input_ids` (masked out by `attention_mask`).
        family: The model family (its name keys `VISION_BATCHING`).
        pad_to_multiple_of: Round the batch length up to a multiple of this.
    """

    def __init__(self, pad_token_id: int, family: Family, pad_to_multiple_of: int | None = None) -> None:
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: the tokenizer has no pad token; set one before batching")
        if family.name not in VISION_BATCHING:
            raise ValueError(f"no batching rules for family {family.name!r}; add them to VISION_BATCHING")
        self.pad_token_id = pad_token_id
        self.family = family
        self.pad_to_multiple_of = pad_to_multiple_of
        self.vision = VISION_BATCHING[family.name]
        self.token_pad = {**_TOKEN_PAD, **_TOKEN_PAD_BY_FAMILY.get(family.name, {})}

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Batch `examples` (each from `encode_vlm_row`); vision keys only when some row has images."""
        if not examples:
            raise ValueError("cannot collate an empty batch")
        length = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": _pad_tokens(examples, "input_ids", length, self.pad_token_id),
            "attention_mask": _pad_tokens(examples, "attention_mask", length, 0),
            "labels": _pad_tokens(examples, "labels", length, IGNORE_INDEX),
        }
        keys = {k for e in examples for k in e} - set(batch) - set(_NOT_BATCHED)
        unknown = sorted(keys - set(self.token_pad) - set(self.vision))
        if unknown:
            raise ValueError(
                f"{self.family.name} rows hold {', '.join(unknown)}, which VLMCollator does not know how to batch; "
                "add them to VISION_BATCHING"
            )
        for key in sorted(keys & set(self.token_pad)):
            batch[key] = _pad_tokens(examples, key, length, self.token_pad[key])
        if not any(k in e for e in examples for k in self.vision if self.vision[k] != _COUNT):
            return batch  # no image in the whole batch: a text-only forward
        for key, how in self.vision.items():
            values = [e.get(key) for e in examples]
            if all(v is None for v in values):
                continue
            if how == _CAT:
                batch[key] = _cat(values)
            elif how == _SAMPLE:
                batch[key] = _sample(values)
            elif how == _COUNT:
                batch[key] = torch.cat([torch.zeros(1, dtype=torch.long) if v is None else v for v in values])
            else:
                batch[key] = _sequence(values, length)
        return batch


def _pad_tokens(examples: list[dict[str, Any]], key: str, length: int, pad: int) -> torch.Tensor:
    out = torch.full((len(examples), length), pad, dtype=torch.long)
    for row, example in enumerate(examples):
        values = example.get(key)
        if values is None:
            if key == "attention_mask":
                values = [1] * len(example["input_ids"])
            else:
                raise ValueError(f"example {row} has no {key!r} while others have")
        if len(values) != len(example["input_ids"]):
            raise ValueError(
                f"example {row} has {len(example['input_ids'])} input_ids but {len(values)} {key}"
            )
        out[row, : len(values)] = torch.as_tensor(values, dtype=torch.long)
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
