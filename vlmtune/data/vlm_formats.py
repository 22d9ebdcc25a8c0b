"""Image-text row formats: each raw row becomes messages with content parts, plus the row's images in order.

A normalised message is `{"role": ..., "content": [part, ...]}` with parts `{"type": "text", "text": ...}` and
`{"type": "image"}`; the images themselves (paths, bytes, PIL images or `datasets` image dicts, not yet opened)
are listed once per row, in the order their parts appear. Accepted layouts:

- `messages` with content parts (`{"type": "image", "image": "a.png"}`), or with `<image>` placeholders in the
  text (or image parts without an `image`) that take the row's top-level `images` (or `image`) in order;
- `sharegpt` (`conversations` of `from` / `value`) with `<image>` placeholders and a top-level `images` list;
- `llava`: LLaVA JSON, `image` (a path or a list) and `conversations` with `<image>` in the human turn;
- any of these from a `datasets` table whose image column holds PIL images or `{"bytes", "path"}` dicts.

A row without any image is a text-only row and is kept as such. Every row then goes through
`formats.check_conversation` (on its text, an image written as `<image>`) and the image rules here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from vlmtune.data.bad_rows import VLM_BAD_ROW_KINDS, BadRow
from vlmtune.data.formats import _SHAREGPT_ROLES, _as_object, _json_type, _require, check_conversation

IMAGE_PLACEHOLDER = "<image>"
__all__ = ["IMAGE_PLACEHOLDER", "VLM_BAD_ROW_KINDS", "VLMBadRow", "VLMConversation", "normalise_vlm"]

ImageRef = (
    Any  # str | os.PathLike | bytes | PIL.Image.Image | {"bytes", "path"}: opened by `images.load_image`
)
Part = dict[str, str]
VLMMessage = dict[str, Any]


class VLMBadRow(BadRow):
    """A `BadRow` raised by the image-text pipeline (often of one of `VLM_BAD_ROW_KINDS`)."""


@dataclass
class VLMConversation:
    """One normalised image-text row.

    Attributes:
        messages: `{"role", "content": [part, ...]}`, checked as a conversation.
        images: The row's images, not yet opened, in the order of the image parts.
    """

    messages: list[VLMMessage]
    images: list[ImageRef] = field(default_factory=list)

    def image_parts(self) -> int:
        return sum(p["type"] == "image" for m in self.messages for p in m["content"])


VLMNormaliser = Callable[[Mapping[str, Any], str | None], VLMConversation]
VLM_FORMATS: dict[str, VLMNormaliser] = {}


def _register(name: str) -> Callable[[VLMNormaliser], VLMNormaliser]:
    def decorator(fn: VLMNormaliser) -> VLMNormaliser:
        VLM_FORMATS[name] = fn
        return fn

    return decorator


def normalise_vlm(row: Any, fmt: str, *, image_key: str | None = None) -> VLMConversation:
    """Turn a raw image-text row into a checked `VLMConversation`.

    Args:
        row: One row (a JSON object or a dict from an Arrow table).
        fmt: A name in `VLM_FORMATS`: `messages`, `sharegpt` or `llava`.
        image_key: The row's image column; by default `images`, else `image`.

    Raises:
        BadRow: the row does not fit the format, breaks a conversation rule, or its placeholders and images do
            not match (`VLMBadRow` for the image kinds).
    """
    try:
        normaliser = VLM_FORMATS[fmt]
    except KeyError:
        raise ValueError(
            f"unknown VLM data format {fmt!r}; known: {', '.join(sorted(VLM_FORMATS))}"
        ) from None
    if not isinstance(row, Mapping):
        raise BadRow("wrong_type", f"the row is {_json_type(row)}; expected a JSON object")
    conversation = normaliser(row, image_key)
    check_vlm_conversation(conversation)
    return conversation


def check_vlm_conversation(conversation: VLMConversation) -> None:
    """The text rules of `formats.check_conversation`, then the image rules.

    Raises:
        BadRow: a broken conversation rule; `VLMBadRow` when images and their parts disagree, or an image is
            outside a user message.
    """
    check_conversation([{"role": m["role"], "content": flat_text(m)} for m in conversation.messages])
    for i, message in enumerate(conversation.messages):
        if message["role"] != "user" and any(p["type"] == "image" for p in message["content"]):
            raise VLMBadRow(
                "image_not_in_user_turn",
                f"message {i} ({message['role']}) holds an image; expected images only in user messages",
            )
    parts = conversation.image_parts()
    if parts != len(conversation.images):
        raise VLMBadRow(
            "image_count_mismatch",
            f"the conversation places {parts} image(s) ({IMAGE_PLACEHOLDER} placeholders or image parts) but the "
            f"row gives {len(conversation.images)}; expected one image per placeholder",
        )


def flat_text(message: VLMMessage) -> str:
    """A message's text with each image written as the placeholder (for checks and display)."""
    return "".join(IMAGE_PLACEHOLDER if p["type"] == "image" else p["text"] for p in message["content"])


@_register("messages")
def _messages(row: Mapping[str, Any], image_key: str | None) -> VLMConversation:
    turns = _require(
        row, "messages", list, 'the row to hold {"messages": [{"role": ..., "content": ...}, ...]}'
    )
    pending = _row_images(row, image_key)
    images: list[ImageRef] = []
    messages = []
    for i, turn in enumerate(turns):
        where = f"message {i}"
        turn = _as_object(turn, where)
        role = turn.get("role")
        if not isinstance(role, str):
            raise BadRow("missing_key" if role is None else "wrong_type", f"{where} has no string 'role'")
        messages.append({"role": role, "content": _parts(turn.get("content"), where, pending, images)})
    return _finish(messages, images, pending)


@_register("sharegpt")
def _sharegpt(row: Mapping[str, Any], image_key: str | None) -> VLMConversation:
    turns = _require(
        row, "conversations", list, 'the row to hold {"conversations": [{"from": ..., "value": ...}, ...]}'
    )
    pending = _row_images(row, image_key)
    images: list[ImageRef] = []
    messages = []
    for i, turn in enumerate(turns):
        where = f"message {i}"
        turn = _as_object(turn, where)
        speaker = turn.get("from")
        if speaker not in _SHAREGPT_ROLES:
            raise BadRow(
                "unknown_role",
                f"{where} is from {speaker!r}; expected one of {', '.join(_SHAREGPT_ROLES)}",
            )
        content = _parts(turn.get("value"), where, pending, images)
        messages.append({"role": _SHAREGPT_ROLES[speaker], "content": content})
    return _finish(messages, images, pending)


# LLaVA JSON is ShareGPT with the image(s) under `image`; `_row_images` looks there when `images` is absent.
_register("llava")(_sharegpt)


class _Pending:
    """The row's top-level images, taken in order by placeholders; counts the placeholders seen."""

    def __init__(self, images: list[ImageRef]) -> None:
        self.images = images
        self.taken = 0

    def take(self) -> ImageRef | None:
        self.taken += 1
        return self.images[self.taken - 1] if self.taken <= len(self.images) else None


def _parts(content: Any, where: str, pending: _Pending, images: list[ImageRef]) -> list[Part]:
    if content is None:
        raise BadRow("missing_key", f"{where} has no content; expected a string or a list of content parts")
    if isinstance(content, str):
        return _split_placeholders(content, pending, images)
    if not isinstance(content, list):
        raise BadRow(
            "wrong_type", f"{where} content is {_json_type(content)}; expected a string or a list of parts"
        )
    parts: list[Part] = []
    for j, part in enumerate(content):
        part_where = f"{where} part {j}"
        part = _as_object(part, part_where)
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRow("wrong_type", f"{part_where} has no string 'text'")
            parts.extend(_split_placeholders(text, pending, images))
        elif kind == "image":
            inline = part.get("image", part.get("path"))
            images.append(inline if inline is not None else pending.take())
            parts.append({"type": "image"})
        else:
            raise BadRow("wrong_type", f"{part_where} has type {kind!r}; expected 'text' or 'image'")
    return parts


def _split_placeholders(text: str, pending: _Pending, images: list[ImageRef]) -> list[Part]:
    pieces = text.split(IMAGE_PLACEHOLDER)
    parts: list[Part] = []
    for k, piece in enumerate(pieces):
        if k > 0:
            images.append(pending.take())
            parts.append({"type": "image"})
        # LLaVA writes "<image>\nQuestion": the newline belongs to the placeholder, not to the question.
        if len(pieces) > 1:
            piece = piece.strip()
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _finish(messages: list[VLMMessage], images: list[ImageRef], pending: _Pending) -> VLMConversation:
    if pending.taken != len(pending.images):
        raise VLMBadRow(
            "image_count_mismatch",
            f"the row gives {len(pending.images)} image(s) but its text has {pending.taken} {IMAGE_PLACEHOLDER} "
            "placeholder(s) (or image parts without an image); expected one placeholder per image",
        )
    return VLMConversation(messages=messages, images=images)


def _row_images(row: Mapping[str, Any], image_key: str | None) -> _Pending:
    keys = (image_key,) if image_key else ("images", "image")
    value = next((row[k] for k in keys if row.get(k) is not None), None)
    if value is None:
        return _Pending([])
    if isinstance(value, (str, bytes, Image.Image, Mapping)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise BadRow("wrong_type", f"the row's images are {_json_type(value)}; expected a path or a list")
    if any(v is None for v in value):
        raise VLMBadRow("bad_image", "the row's image list holds null; expected a path or image data")
    return _Pending(list(value))
