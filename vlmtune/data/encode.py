"""The one seam between rows and tokens: a text model's tokenizer, or a vision-language model's processor.

`Encoder.encode` turns a normalised row into token ids and a label mask without decoding any image: each
image's size is read from its header, and its placeholder is expanded the way the family's processor would
expand it for that size (`vision_tokens.expand_text`). `Encoder.vision_inputs` runs later, when a micro-batch
is collated (in the DataLoader workers): it decodes the row's images, runs the processor, and checks that the
processor's tokens are the ones indexed, so a run never trains on misaligned tokens.

The label mask comes from characters, as `template.py` explains: each assistant reply's span is found in the
rendered conversation, then moved to where it lies in the text the processor tokenises. Processors rewrite the
text before tokenising it: they expand each image placeholder into the image's tokens, and some change the
layout first (`Family.text_layout`). A token is trained when its offsets overlap a moved span; image tokens and
padding never are. Each trained span is then checked to decode to the reply it came from, so a processor that
rewrites text in a new way fails loudly instead of training the wrong tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vlmtune.data.bad_rows import BadRow
from vlmtune.data.formats import Conversation, Pair
from vlmtune.data.images import DEFAULT_MAX_PIXELS, BadImage, header_size, load_image
from vlmtune.data.template import (
    ChatTemplateError,
    assistant_spans,
    check_spans,
    check_tokenizer,
    move_spans,
    overlaps,
    render,
    tokenize_conversation,
)
from vlmtune.data.vision_tokens import UnsupportedImageSize, expand_text, image_settings
from vlmtune.errors import DataError

if TYPE_CHECKING:
    from vlmtune.families import Family

IGNORE_INDEX = -100  # the label of a token that is not trained (what transformers' losses skip)

# Processor outputs that are not vision inputs: the text side, which the index already holds.
_TEXT_KEYS = ("input_ids", "attention_mask", "offset_mapping", "text_replacement_offsets", "labels")


@dataclass
class EncodedRow:
    """One row's tokens: ids, which are trained, and where its images sit.

    Attributes:
        ids: Token ids after image expansion.
        trained: Per token, whether it carries a label.
        last_image: Index of the last image token (-1 without images): truncation must keep it.
        image_tokens: Image tokens in the row.
        images: Images in the row.
    """

    ids: np.ndarray
    trained: np.ndarray
    last_image: int = -1
    image_tokens: int = 0
    images: int = 0


@dataclass
class EncodedPair:
    """A preference row's two sequences: prompt + chosen and prompt + rejected, each trained on its reply."""

    chosen: EncodedRow
    rejected: EncodedRow

    def sides(self) -> tuple[EncodedRow, EncodedRow]:
        return self.chosen, self.rejected


class Encoder:
    """Encodes rows for one model: with its tokenizer (`family` None) or its processor (a VLM family).

    Args:
        encoder: A fast tokenizer with a chat template, or a VLM processor holding one.
        family: The vision-language family, None for a text model.
        train_on_prompt: Train every token except image tokens, prompts included.
        max_pixels: Largest image accepted (width x height), against decompression bombs.
    """

    def __init__(
        self,
        encoder: Any,
        family: Family | None = None,
        *,
        train_on_prompt: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.processor = encoder if family is not None else None
        self.tokenizer = getattr(encoder, "tokenizer", encoder) if family is not None else encoder
        self.family = family
        self.train_on_prompt = train_on_prompt
        self.max_pixels = max_pixels
        if family is None:
            check_tokenizer(self.tokenizer)
        else:
            # Added tokens the tokenizer cuts the text at without touching the whitespace around them.
            self._clean_added = tuple(
                t.content
                for t in self.tokenizer.added_tokens_decoder.values()
                if not (getattr(t, "lstrip", False) or getattr(t, "rstrip", False))
            )
            self._splice, self._splice_checks = True, 16
            self._image_token_ids = dict(
                zip(family.image_tokens, family.image_token_ids(encoder), strict=True)
            )
            self._image_ids = np.asarray(list(self._image_token_ids.values()), dtype=np.int64)
            pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
            # Never trained: image tokens, and pad (where pad is eos, that token ends every reply and is trained).
            self._never = np.append(self._image_ids, [pad] if pad is not None and pad != eos else [])

    @property
    def vision(self) -> bool:
        return self.family is not None

    def fingerprint(self) -> str | None:
        """A digest of everything encoding depends on (vocabulary, chat template, image settings); None when it
        cannot be taken (then nothing is cached)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        h = hashlib.sha256()
        h.update(type(self.tokenizer).__name__.encode())
        h.update(backend.to_str().encode())
        template = getattr(self.processor, "chat_template", None) or self.tokenizer.chat_template
        h.update(str(template).encode())
        h.update(json.dumps(self.tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
        h.update(json.dumps([self.train_on_prompt, self.max_pixels]).encode())
        if self.processor is not None:
            h.update(self.family.name.encode())
            # As the processor's call resolves them: its own image kwargs over the image processor's.
            h.update(json.dumps(image_settings(self.processor), sort_keys=True, default=str).encode())
        return h.hexdigest()

    # --- indexing: no pixels ---------------------------------------------------------------------------

    def encode(
        self,
        conversation: Conversation | Pair,
        *,
        source: str = "<data>",
        row: int = 0,
        image_root: str | os.PathLike[str] | None = None,
    ) -> EncodedRow | EncodedPair:
        """Render, expand and tokenise a row, and mask its labels; images are read for their size only.

        A preference row's sides are encoded alike, each trained on its reply only; a prompt row ends with the
        generation prompt and trains nothing (`train_on_prompt` applies to neither).

        Args:
            conversation: The normalised row (a `Pair` for a preference row).
            source: The data source, as image errors name it.
            row: The row's index in `source`.
            image_root: Folder of relative image paths.

        Raises:
            BadRow: an image is missing or unreadable (`bad_image`), the family needs an image and the row has
                none (`images_required`), the template refused the row, or nothing is left to train.
            ChatTemplateError: the template or processor does not let the replies be located exactly.
        """
        if isinstance(conversation, Pair):
            chosen, rejected = (
                self.encode(side, source=source, row=row, image_root=image_root)
                for side in conversation.sides()
            )
            return EncodedPair(chosen, rejected)
        if self.family is None:
            return self._encode_text(conversation)
        family = self.family
        if family.needs_images and not conversation.images:
            raise BadRow(
                "images_required",
                f"the row has no image, and {family.name} models cannot train on text alone; "
                "give every row an image, or use another family for text-only data",
            )
        sizes = [
            self._image(header_size, image, source, row, i, image_root)
            for i, image in enumerate(conversation.images)
        ]
        text, spans = assistant_spans(
            self.processor,
            _render_messages(conversation),
            trained_from=conversation.prompt_turns,
            add_generation_prompt=conversation.generation_prompt,
        )
        self._check_placeholders(text, len(sizes))
        expanded, replacements = self._expand(text, sizes)
        ids, offsets = self._tokenize(expanded, replacements)
        never = np.isin(ids, self._never)
        if self._trains_prompt(conversation):
            trained = ~never
        else:
            moved = move_spans(spans, text, replacements, family, self.tokenizer)
            check_spans(text, spans, moved, ids, offsets, self.tokenizer)
            trained = overlaps(offsets, moved) & ~never
        if conversation.trains and not trained.any():
            raise BadRow(
                "no_trained_tokens",
                "no token of the rendered conversation falls in an assistant reply, so there is nothing to train",
            )
        image_positions = np.flatnonzero(np.isin(ids, self._image_ids))
        last = int(image_positions[-1]) if len(image_positions) else -1
        return EncodedRow(ids, trained, last, len(image_positions), len(sizes))

    def _trains_prompt(self, conversation: Conversation) -> bool:
        # Preference and prompt rows never train their prompt: DPO and GRPO score the replies alone.
        return self.train_on_prompt and conversation.trains and not conversation.prompt_turns

    def _encode_text(self, conversation: Conversation) -> EncodedRow:
        ids, trained = tokenize_conversation(
            self.tokenizer,
            conversation.text_messages(),
            train_on_prompt=self._trains_prompt(conversation),
            trained_from=conversation.prompt_turns,
            add_generation_prompt=conversation.generation_prompt,
        )
        if conversation.trains and not any(trained):
            raise BadRow(
                "no_trained_tokens",
                "no token of the rendered conversation falls in an assistant reply, so there is nothing to train; "
                "check that the chat template renders assistant messages",
            )
        return EncodedRow(np.asarray(ids, dtype=np.int32), np.asarray(trained, dtype=bool))

    def _expand(self, text: str, sizes: list[tuple[int, int]]) -> tuple[str, list[dict]]:
        try:
            return expand_text(self.processor, self.family, text, sizes)
        except UnsupportedImageSize as exc:
            raise BadRow("bad_image", str(exc)) from None

    def _tokenize(self, text: str, replacements: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and character offsets (`(tokens, 2)`) of the expanded text.

        An image's replacement is thousands of characters of image tokens, most of the tokenizer's work. Where it
        starts and ends with an added token (which the tokenizer splits the text at anyway, unless it strips
        whitespace around it), the text between replacements is tokenised alone and each replacement's tokens are
        spliced in: the same ids and offsets, much faster. The first rows are checked against tokenising the whole
        text, and any difference turns splicing off for good (the collate-time check guards the rest).
        """
        if self._splice and all(self._spliceable(r["replacement"]) for r in replacements):
            ids, offsets = self._spliced(text, replacements)
            if self._splice_checks > 0:
                self._splice_checks -= 1
                whole = self._whole(text)
                if not (np.array_equal(whole[0], ids) and np.array_equal(whole[1], offsets)):
                    self._splice = False  # never again in this process
                    return whole
            return ids, offsets
        return self._whole(text)

    def _whole(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        out = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = np.asarray(out["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        return np.asarray(out["input_ids"], dtype=np.int32), offsets

    def _spliceable(self, replacement: str) -> bool:
        return replacement.startswith(self._clean_added) and replacement.endswith(self._clean_added)

    def _spliced(self, text: str, replacements: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        pieces: list[tuple[int, str]] = []  # (where it starts in `text`, the piece)
        at = 0
        for r in sorted(replacements, key=lambda r: r["new_span"][0]):
            start, end = r["new_span"]
            pieces += [(at, text[at:start]), (start, r["replacement"])]
            at = end
        pieces.append((at, text[at:]))
        ids, offsets = [], []
        for start, piece in pieces:
            if piece:
                piece_ids, piece_offsets = self._piece(piece)
                ids.append(piece_ids)
                offsets.append(piece_offsets + start)
        if not ids:
            return np.zeros(0, dtype=np.int32), np.zeros((0, 2), dtype=np.int64)
        return np.concatenate(ids), np.concatenate(offsets)

    def _piece(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Tokenise a piece; a run of one image token (Qwen-VL's image pads) is written out, not tokenised."""
        for token, token_id in self._image_token_ids.items():
            n = len(text) // len(token)
            if n and len(text) == n * len(token) and text == token * n:
                starts = np.arange(n, dtype=np.int64) * len(token)
                return np.full(n, token_id, dtype=np.int32), np.stack([starts, starts + len(token)], axis=1)
        return self._whole(text)

    def _check_placeholders(self, text: str, images: int) -> None:
        placeholder = self.family.image_placeholder
        if text.count(placeholder) != images:
            raise ChatTemplateError(
                f"the chat template wrote {text.count(placeholder)} {placeholder!r} placeholder(s) for {images} "
                "image(s); it must write one per image part"
            )

    def image_sizes(
        self,
        conversation: Conversation,
        *,
        source: str,
        row: int,
        image_root: str | os.PathLike[str] | None = None,
    ) -> list[tuple[int, int]]:
        """The `(width, height)` of each of the row's images as the file is, upright (EXIF applied), before any
        resize of the processor: the pixels a reward's boxes are given in.

        Raises:
            BadRow: an image is missing or unreadable (`bad_image`).
        """
        sizes = [
            self._image(header_size, image, source, row, i, image_root)
            for i, image in enumerate(conversation.images)
        ]
        return [(width, height) for height, width in sizes]

    def _image(self, read: Any, image: Any, source: str, row: int, index: int, image_root: Any) -> Any:
        """`read` (`header_size` or `load_image`) one image; a broken one is a bad row naming it."""
        try:
            return read(
                image, source=source, row=row, index=index, image_root=image_root, max_pixels=self.max_pixels
            )
        except BadImage as exc:
            raise BadRow("bad_image", f"image {index} ({exc.path}): {exc.problem}") from exc

    # --- collating: pixels -------------------------------------------------------------------------------

    def vision_inputs(
        self,
        conversation: Conversation,
        ids: Sequence[int],
        *,
        source: str,
        row: int,
        image_root: str | os.PathLike[str] | None = None,
    ) -> dict[str, Any]:
        """Decode the row's images and run the processor: its vision inputs and per-token outputs.

        Args:
            conversation: The row, normalised as when it was indexed.
            ids: The row's indexed token ids (possibly truncated): the processor's must start with them.
            source: The data source, as messages name it.
            row: The row's index in `source`.
            image_root: Folder of relative image paths.

        Raises:
            BadRow: an image cannot be decoded (`bad_image`).
            DataError: the processor's tokens differ from the indexed ones (an image changed on disk since it
                was indexed, say): training on them would misalign images and text.
        """
        if not conversation.images:
            return {}
        opened = [
            self._image(load_image, image, source, row, i, image_root)
            for i, image in enumerate(conversation.images)
        ]
        text = render(
            self.processor,
            _render_messages(conversation),
            add_generation_prompt=conversation.generation_prompt,
        )
        out = self.processor(text=[text], images=[opened], add_special_tokens=False, return_tensors="pt")
        got = out["input_ids"][0]
        if len(got) < len(ids) or got[: len(ids)].tolist() != list(ids):
            raise DataError(
                f"{source} row {row}: the processor gives {len(got)} tokens for this row now, but {len(ids)} were indexed "
                "(with different image tokens): an image changed since the data was indexed, or the image "
                "processor settings differ. Clear the index with `rm -rf ~/.cache/vlmtune/tokenized` (or "
                "$VLMTUNE_CACHE_DIR) and start again; no step trained on this row"
            )
        return {key: self._cut(key, value, len(ids)) for key, value in out.items() if key not in _TEXT_KEYS}

    def _cut(self, key: str, value: Any, keep: int) -> Any:
        """A processor output for this row alone: per-token ones as lists cut like the indexed ids, vision
        inputs as the processor gives them."""
        if key in self.family.token_pad:
            return value[0, :keep].tolist()
        if self.family.vision_batching.get(key) == "sequence":
            return value[0, :keep]  # (seq, images, tiles), cut with the tokens
        return value


def _render_messages(conversation: Conversation) -> list[dict[str, Any]]:
    # The template's own image part (`{"type": "image"}`); the images themselves go to the processor.
    return [
        {
            "role": m["role"],
            "content": [{"type": "image"} if p["type"] == "image" else dict(p) for p in m["content"]],
        }
        for m in conversation.messages
    ]
