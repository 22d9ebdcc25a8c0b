"""Encode one image-text conversation with a family's processor: ids, label mask and the row's vision inputs.

Rows are processed one at a time (batched processor calls fail on mixed text-only and image batches for several
families) and batched later by `vlm_collate.VLMCollator`.

The label mask comes from characters, as for text (`template.py`): each assistant reply's span is found in the
rendered conversation, then moved to where it lies in the text the processor actually tokenises. Processors
rewrite the text before tokenising it: they expand each image placeholder into the image's tokens (reported by
`return_text_replacement_offsets`), and some change the layout first (`_LAYOUT`). A token is trained when its
offsets overlap a moved span; image tokens and padding never are. Each trained span is then checked to decode to
the reply it came from, so a processor that rewrites text in a new way fails loudly instead of training the
wrong tokens.
"""

from __future__ import annotations

import bisect
import copy
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vlmtune.data.dataset import IGNORE_INDEX
from vlmtune.data.images import DEFAULT_MAX_PIXELS, BadImage, load_image
from vlmtune.data.template import ChatTemplateError, _overlaps, assistant_spans
from vlmtune.data.vlm_formats import VLMBadRow, VLMMessage

if TYPE_CHECKING:
    from vlmtune.model.families import Family

# Processor outputs aligned with the tokens, as `(key, dim of the sequence in the unbatched tensor)`: cut with
# the tokens when a row is truncated, padded by the collator.
TOKEN_KEYS = {"input_ids": 0, "attention_mask": 0, "token_type_ids": 0, "mm_token_type_ids": 0}
SEQUENCE_KEYS = {"cross_attention_mask": 0}  # mllama: (seq, images, tiles)
_DROPPED_KEYS = ("offset_mapping", "text_replacement_offsets", "labels")

# How a processor changes the rendered text before expanding image placeholders (per family, so that the spans
# of the rendered text can be moved onto the tokenised one):
#   bos_after_last_image: PaliGemma writes bos right after the last image placeholder, and appends "\n".
#   bos_if_missing: Mllama prepends bos to a text that does not start with it.
_LAYOUT = {"paligemma": "bos_after_last_image", "mllama": "bos_if_missing"}


class Overlength(Exception):
    """A row longer than `max_length` that was not truncated.

    Attributes:
        length: Tokens after image expansion.
        max_length: The limit.
        cuts_images: Truncating it would cut through image tokens (or leave no trained token): it must be dropped
            or raised, never truncated.
    """

    def __init__(self, length: int, max_length: int, cuts_images: bool, reason: str) -> None:
        self.length = length
        self.max_length = max_length
        self.cuts_images = cuts_images
        super().__init__(
            f"{length} tokens after image expansion, more than max_length {max_length}: {reason}"
        )


def encode_vlm_row(
    processor: Any,
    family: Family,
    messages: list[VLMMessage],
    images: Sequence[Any],
    *,
    max_length: int,
    train_on_prompt: bool = False,
    truncate: bool = False,
    source: str = "<data>",
    row: int = 0,
    image_root: str | os.PathLike[str] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """Open the images, render and tokenise the conversation, mask the labels and keep the vision inputs.

    Args:
        processor: The family's processor, with a chat template that writes `family.image_placeholder` for an
            image part and a fast tokenizer.
        family: The model family.
        messages: Checked messages with content parts (`vlm_formats.normalise_vlm`).
        images: The row's images in placeholder order (paths, bytes, PIL images or `datasets` image dicts).
        max_length: Most tokens a row may have after image expansion.
        train_on_prompt: Train every token except image tokens, prompts included.
        truncate: Cut a text-only row (or one whose image tokens all come before `max_length`) to `max_length`
            instead of raising `Overlength`.
        source: The data file, as image errors name it.
        row: The row's index in `source`.
        image_root: Folder of relative image paths.
        max_pixels: Largest image accepted (width x height).

    Returns:
        `input_ids`, `labels` and `attention_mask` (lists of ints, labels -100 where not trained), `length`,
        any other per-token output (`token_type_ids`, `mm_token_type_ids`), and the family's vision inputs as
        the processor returns them for this row alone (tensors, under their processor keys).

    Raises:
        VLMBadRow: an image cannot be opened (`bad_image`), the family needs an image and the row has none
            (`images_required`), or nothing is left to train.
        BadRow: the chat template refused the conversation.
        Overlength: longer than `max_length` and not truncated.
        ChatTemplateError: the template or processor does not let the replies be located exactly.
    """
    if family.needs_images and not images:
        raise VLMBadRow(
            "images_required",
            f"the row has no image, and {family.name} models cannot train on text alone; "
            "give every row an image, or use another family for text-only data",
        )
    opened = [_open(image, source, row, i, image_root, max_pixels) for i, image in enumerate(images)]
    render_messages = [
        {
            "role": m["role"],
            "content": [{"type": "image"} if p["type"] == "image" else dict(p) for p in m["content"]],
        }
        for m in messages
    ]
    text, spans = assistant_spans(processor, copy.deepcopy(render_messages))
    placeholders = text.count(family.image_placeholder)
    if placeholders != len(opened):
        raise ChatTemplateError(
            f"the chat template wrote {placeholders} {family.image_placeholder!r} placeholder(s) for "
            f"{len(opened)} image(s); it must write one per image part"
        )
    out = processor(
        text=[text],
        images=[opened] if opened else None,
        add_special_tokens=False,  # the template writes any bos itself
        return_offsets_mapping=True,
        return_text_replacement_offsets=True,
        return_tensors="pt",
    )
    ids = out["input_ids"][0].tolist()
    tokenizer = getattr(processor, "tokenizer", processor)
    never = set(family.image_token_ids(processor))
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        never.add(tokenizer.pad_token_id)  # where pad is eos, that token ends every reply and is trained
    if train_on_prompt:
        trained = [True] * len(ids)
    else:
        moved = _move_spans(spans, text, out, family, tokenizer)
        trained = _overlaps(out["offset_mapping"][0].tolist(), moved)
        _check_spans(text, spans, moved, ids, out["offset_mapping"][0].tolist(), tokenizer)
    trained = [t and i not in never for t, i in zip(trained, ids, strict=True)]
    if not any(trained):
        raise VLMBadRow(
            "no_trained_tokens",
            "no token of the rendered conversation falls in an assistant reply, so there is nothing to train",
        )

    example: dict[str, Any] = {}
    for key, value in out.items():
        if key in _DROPPED_KEYS:
            continue
        if key in TOKEN_KEYS:
            example[key] = value[0].tolist()
        elif key in SEQUENCE_KEYS:
            example[key] = value[0]
        else:
            example[key] = value
    example["labels"] = [i if t else IGNORE_INDEX for i, t in zip(ids, trained, strict=True)]
    if family.token_type_ids == "prefix":
        # 0 is the bidirectional prefix: from the first trained token on, attention must be causal, or the
        # answer would see its own future. (PaliGemma's processor marks everything 0 without a `suffix`.)
        first = trained.index(True)
        example["token_type_ids"] = [0] * first + [1] * (len(ids) - first)
    if len(ids) > max_length:
        example = _fit(example, ids, never, max_length, truncate)
    example["length"] = len(example["input_ids"])
    return example


def _open(image: Any, source: str, row: int, index: int, root: Any, max_pixels: int) -> Any:
    try:
        return load_image(image, source=source, row=row, index=index, image_root=root, max_pixels=max_pixels)
    except BadImage as exc:
        raise VLMBadRow("bad_image", f"image {index} ({exc.path}): {exc.problem}") from exc


def _move_spans(
    spans: list[tuple[int, int]], text: str, out: Any, family: Family, tokenizer: Any
) -> list[tuple[int, int]]:
    """Move `[start, end)` spans of the rendered text onto the text the processor tokenised."""
    layout = _LAYOUT.get(family.name)
    bos = tokenizer.bos_token or ""
    inserted_at, inserted = len(text) + 1, 0
    if layout == "bos_after_last_image" and family.image_placeholder in text:
        inserted_at = text.rfind(family.image_placeholder) + len(family.image_placeholder)
        inserted = len(bos)
    elif layout == "bos_if_missing" and not text.startswith(bos):
        inserted_at, inserted = 0, len(bos)

    # One list of replacements per text; a processor with nothing to replace may return an empty tensor.
    replacements = out.get("text_replacement_offsets")
    replacements = list(replacements[0]) if isinstance(replacements, list) and replacements else []
    ends = [r["span"][1] for r in replacements]
    gained = [0]
    for r in replacements:
        gained.append(gained[-1] + (r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0]))

    def move(char: int) -> int:
        char += inserted if char >= inserted_at else 0
        return char + gained[bisect.bisect_right(ends, char)]

    return [(move(start), move(end)) for start, end in spans]


def _check_spans(
    text: str,
    spans: list[tuple[int, int]],
    moved: list[tuple[int, int]],
    ids: list[int],
    offsets: list[list[int]],
    tokenizer: Any,
) -> None:
    """Each moved span, read back from the tokens, must be the reply it came from: else it was misplaced.

    The tokens overlapping a moved span are decoded, and the span's characters are cut from that text by the
    first token's offset; a span moved by even one character reads back differently.
    """
    for (start, end), (lo, hi) in zip(spans, moved, strict=True):
        covered = [(i, a) for i, (a, b) in zip(ids, offsets, strict=True) if a < hi and b > lo]
        decoded = tokenizer.decode([i for i, _ in covered], clean_up_tokenization_spaces=False)
        skip = lo - covered[0][1] if covered else 0
        read_back = decoded[skip : skip + (hi - lo)]
        if read_back.strip() != text[start:end].strip():
            raise ChatTemplateError(
                f"the assistant reply {text[start:end]!r} reads back from the processor's tokens as "
                f"{read_back!r}: the processor rewrote the text in a way vlmtune.data.vlm_encode does not know, "
                "so the label mask cannot be placed; add the family's layout rule to _LAYOUT"
            )


def _fit(example: dict[str, Any], ids: list[int], never: set[int], max_length: int, truncate: bool) -> dict:
    length = len(ids)
    last_image = max((i for i, t in enumerate(ids) if t in never), default=-1)
    if last_image >= max_length:
        raise Overlength(length, max_length, True, "truncating would cut through its image tokens")
    if not truncate:
        raise Overlength(length, max_length, False, "drop it, truncate it, or raise max_length")
    if all(label == IGNORE_INDEX for label in example["labels"][:max_length]):
        raise Overlength(length, max_length, True, "truncating would leave no trained token")
    cut = dict(example)
    for key in (*TOKEN_KEYS, "labels"):
        if key in cut:
            cut[key] = cut[key][:max_length]
    for key in SEQUENCE_KEYS:
        if key in cut:
            cut[key] = cut[key][:max_length]
    return cut
