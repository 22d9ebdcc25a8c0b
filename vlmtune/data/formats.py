"""Row formats: each reads one raw row into a `Conversation`: messages with content parts, and the row's images.

One reader per format, for text and image-text rows alike: a text row is an image-text row with no images. A
normalised message is `{"role": ..., "content": [part, ...]}` with parts `{"type": "text", "text": ...}` and
`{"type": "image"}`; the images themselves (paths, bytes, PIL images or `datasets` image dicts, not opened) are
listed once per row, in the order their parts appear. Accepted layouts:

- `messages`: string content, or content parts (`{"type": "image", "image": "a.png"}`), or `<image>`
  placeholders in the text (or image parts without an `image`) that take the row's `images` (or `image`) in order;
- `sharegpt` (`conversations` of `from` / `value`) with `<image>` placeholders and a top-level `images` list;
- `llava`: LLaVA JSON, `image` (a path or a list) and `conversations` with `<image>` in the human turn;
- `alpaca`: `instruction`, optional `input` and `system`, `output` (text only);
- `preference` and `prompt` (for DPO and GRPO), read in `prompt_formats`: a preference row becomes a `Pair` of
  conversations (prompt + chosen, prompt + rejected), a prompt row a conversation that ends on the prompt;
- any of these from a `datasets` table whose image column holds PIL images or `{"bytes", "path"}` dicts.

For a text model (`vision=False`) `<image>` is ordinary text and image columns are not read. Every row then goes
through `check_conversation` (on its text, an image written as `<image>`) and the image rules here. Adding a
format is one decorated reader here (plus its name in `DataSource.format`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from vlmtune.data.bad_rows import BadRow

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")
_ALTERNATION = "expected user/assistant turns alternating, starting with user"

ImageRef = (
    Any  # str | os.PathLike | bytes | PIL.Image.Image | {"bytes", "path"}: opened by `images.load_image`
)
Part = dict[str, str]
Message = dict[str, Any]


@dataclass
class Conversation:
    """One normalised row.

    Attributes:
        messages: `{"role", "content": [part, ...]}`, checked as a conversation.
        images: The row's images, not yet opened, in the order of the image parts.
        prompt_turns: Leading messages never trained, replies included: a preference pair's prompt, all of a
            prompt row.
        generation_prompt: A prompt row: it ends on the prompt and is rendered with the generation prompt.
    """

    messages: list[Message]
    images: list[ImageRef] = field(default_factory=list)
    prompt_turns: int = 0
    generation_prompt: bool = False

    @property
    def trains(self) -> bool:
        """Whether any token of this conversation can be trained (a prompt row has none)."""
        return not self.generation_prompt

    def image_parts(self) -> int:
        return sum(p["type"] == "image" for m in self.messages for p in m["content"])

    def text_messages(self) -> list[dict[str, str]]:
        """`{"role", "content": str}` messages, each image written as `<image>` (what text chat templates take)."""
        return [{"role": m["role"], "content": flat_text(m)} for m in self.messages]


@dataclass
class Pair:
    """A preference row: the same prompt (and images) completed by the chosen and by the rejected reply."""

    chosen: Conversation
    rejected: Conversation

    def sides(self) -> tuple[Conversation, Conversation]:
        return self.chosen, self.rejected

    @property
    def images(self) -> list[ImageRef]:
        """The row's images (both sides show the same ones)."""
        return self.chosen.images

    @property
    def messages(self) -> list[Message]:
        """The chosen side's messages: what a caller that samples a row's text and images reads (`plan`)."""
        return self.chosen.messages


Reader = Callable[["_Row"], "Conversation | Pair"]
FORMATS: dict[str, Reader] = {}


def register_format(name: str) -> Callable[[Reader], Reader]:
    """Register `fn` as the reader of rows in format `name`."""

    def decorator(fn: Reader) -> Reader:
        if name in FORMATS:
            raise ValueError(f"data format {name!r} is registered twice")
        FORMATS[name] = fn
        return fn

    return decorator


def normalise(
    row: Any, fmt: str, *, vision: bool = True, image_key: str | None = None
) -> Conversation | Pair:
    """Turn a raw row into a checked `Conversation` (a `Pair` of them for a preference row).

    Args:
        row: One row as read from the file (a JSON object, or a dict from an Arrow table).
        fmt: A name in `FORMATS`.
        vision: Read images (a vision-language model). Without, `<image>` is text and image columns are ignored.
        image_key: The row's image column; by default `images`, else `image`.

    Returns:
        The conversation: an optional system message, then user/assistant turns, ending with the assistant
        (with the user for a prompt row).

    Raises:
        BadRow: the row does not fit the format, breaks a conversation rule, or its placeholders and images do
            not match.
    """
    try:
        reader = FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown data format {fmt!r}; known: {', '.join(sorted(FORMATS))}") from None
    if not isinstance(row, Mapping):
        raise BadRow("wrong_type", f"the row is {_json_type(row)}; expected a JSON object")
    conversation = reader(_Row(row, vision, image_key))
    for side in conversation.sides() if isinstance(conversation, Pair) else (conversation,):
        check_conversation(side)
    return conversation


def flat_text(message: Message) -> str:
    """A message's text with each image written as the placeholder (for checks, text templates and display)."""
    return "".join(IMAGE_PLACEHOLDER if p["type"] == "image" else p["text"] for p in message["content"])


def check_conversation(conversation: Conversation) -> None:
    """Check the rules every format shares, then the image rules.

    An optional system message comes first, then user and assistant alternate starting with user, and the
    assistant speaks last, so that every trained reply answers a prompt (a prompt row ends with the user, whose
    turn the generation answers). Images appear only in user messages,
    one per image part. Message indices in the problems are 0-based, like row numbers.

    Raises:
        BadRow: naming the first broken rule and what was expected.
    """
    messages = conversation.text_messages()
    if not messages:
        raise BadRow(
            "empty_conversation", "the conversation is empty; expected a user message and an assistant reply"
        )
    for i, message in enumerate(messages):
        if message["role"] not in ROLES:
            raise BadRow(
                "unknown_role",
                f"message {i} has unknown role {message['role']!r}; expected one of {', '.join(ROLES)}",
            )
    if conversation.trains and not any(m["role"] == "assistant" for m in messages):
        raise BadRow(
            "no_assistant_turn",
            "the conversation has no assistant message; expected at least one assistant reply to train on",
        )
    _check_order(messages, "assistant" if conversation.trains else "user")
    for i, message in enumerate(messages):
        if not message["content"].strip():
            raise BadRow(
                "empty_content", f"message {i} ({message['role']}) has empty content; expected non-empty text"
            )
    for i, message in enumerate(conversation.messages):
        if message["role"] != "user" and any(p["type"] == "image" for p in message["content"]):
            raise BadRow(
                "image_not_in_user_turn",
                f"message {i} ({message['role']}) holds an image; expected images only in user messages",
            )
    parts = conversation.image_parts()
    if parts != len(conversation.images):
        raise BadRow(
            "image_count_mismatch",
            f"the conversation places {parts} image(s) ({IMAGE_PLACEHOLDER} placeholders or image parts) but the "
            f"row gives {len(conversation.images)}; expected one image per placeholder",
        )


def _check_order(messages: list[Message], last_role: str) -> None:
    first = 1 if messages[0]["role"] == "system" else 0
    previous = messages[0]["role"] if first else None
    for i in range(first, len(messages)):
        role = messages[i]["role"]
        expected = "user" if (i - first) % 2 == 0 else "assistant"
        if role == expected:
            previous = role
            continue
        if role == "system":
            problem = (
                f"message {i} has role 'system' after {previous!r}; expected a system message only first"
            )
        elif previous in (None, "system"):
            problem = f"message {i} has role {role!r} at the start; {_ALTERNATION}"
        else:
            problem = f"message {i} has role {role!r} after {previous!r}; {_ALTERNATION}"
        raise BadRow("role_order", problem)
    last = messages[-1]["role"]
    if last != last_role:
        expected = (
            "an assistant reply" if last_role == "assistant" else "a user message (the prompt to answer)"
        )
        raise BadRow(
            "role_order",
            f"the last message ({len(messages) - 1}) has role {last!r}; expected the conversation to end with "
            f"{expected}",
        )


class _Row:
    """A raw row being read, with the row's top-level images that placeholders take in order."""

    def __init__(self, row: Mapping[str, Any], vision: bool, image_key: str | None) -> None:
        self.row = row
        self.vision = vision
        self.pending = _row_images(row, image_key) if vision else []
        self.taken = 0
        self.images: list[ImageRef] = []

    def take(self) -> ImageRef | None:
        self.taken += 1
        return self.pending[self.taken - 1] if self.taken <= len(self.pending) else None

    def content(self, value: Any, where: str) -> list[Part]:
        """A message's content (a string, or a list of parts) as parts, images taken in order."""
        if value is None:
            raise BadRow(
                "missing_key", f"{where} has no 'content'; expected a string or a list of content parts"
            )
        if isinstance(value, str):
            return self.split_placeholders(value)
        if not isinstance(value, list):
            raise BadRow(
                "wrong_type",
                f"{where} 'content' is {_json_type(value)}; expected a string or a list of parts",
            )
        parts: list[Part] = []
        for j, part in enumerate(value):
            part_where = f"{where} part {j}"
            part = _as_object(part, part_where)
            kind = part.get("type")
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise BadRow("wrong_type", f"{part_where} has no string 'text'")
                parts.extend(self.split_placeholders(text))
            elif kind == "image" and self.vision:
                inline = part.get("image", part.get("path"))
                self.images.append(inline if inline is not None else self.take())
                parts.append({"type": "image"})
            elif kind == "image":
                raise BadRow(
                    "wrong_type",
                    f"{part_where} is an image, but the model is not a vision-language model; expected text",
                )
            else:
                raise BadRow("wrong_type", f"{part_where} has type {kind!r}; expected 'text' or 'image'")
        return parts

    def split_placeholders(self, text: str) -> list[Part]:
        if not self.vision:
            return [{"type": "text", "text": text}]
        pieces = text.split(IMAGE_PLACEHOLDER)
        parts: list[Part] = []
        for k, piece in enumerate(pieces):
            if k > 0:
                self.images.append(self.take())
                parts.append({"type": "image"})
            # LLaVA writes "<image>\nQuestion": the newline belongs to the placeholder, not to the question.
            if len(pieces) > 1:
                piece = piece.strip()
            if piece:
                parts.append({"type": "text", "text": piece})
        return parts

    def finish(self, messages: list[Message]) -> Conversation:
        if self.taken != len(self.pending):
            raise BadRow(
                "image_count_mismatch",
                f"the row gives {len(self.pending)} image(s) but its text has {self.taken} {IMAGE_PLACEHOLDER} "
                "placeholder(s) (or image parts without an image); expected one placeholder per image",
            )
        return Conversation(messages=messages, images=self.images)


def _row_images(row: Mapping[str, Any], image_key: str | None) -> list[ImageRef]:
    keys = (image_key,) if image_key else ("images", "image")
    value = next((row[k] for k in keys if row.get(k) is not None), None)
    if value is None:
        return []
    if isinstance(value, (str, bytes, Image.Image, Mapping)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise BadRow("wrong_type", f"the row's images are {_json_type(value)}; expected a path or a list")
    if any(v is None for v in value):
        raise BadRow("bad_image", "the row's image list holds null; expected a path or image data")
    return list(value)


@register_format("messages")
def _messages(r: _Row) -> Conversation:
    turns = _require(
        r.row, "messages", list, 'the row to hold {"messages": [{"role": ..., "content": ...}, ...]}'
    )
    messages = []
    for i, turn in enumerate(turns):
        where = f"message {i}"
        turn = _as_object(turn, where)
        role = _require_str(turn, "role", where)
        messages.append({"role": role, "content": r.content(turn.get("content"), where)})
    return r.finish(messages)


_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


@register_format("sharegpt")
def _sharegpt(r: _Row) -> Conversation:
    turns = _require(
        r.row, "conversations", list, 'the row to hold {"conversations": [{"from": ..., "value": ...}, ...]}'
    )
    messages = []
    for i, turn in enumerate(turns):
        where = f"message {i}"
        turn = _as_object(turn, where)
        speaker = _require_str(turn, "from", where)
        if speaker not in _SHAREGPT_ROLES:
            raise BadRow(
                "unknown_role",
                f"{where} is from {speaker!r}; expected one of {', '.join(_SHAREGPT_ROLES)}",
            )
        value = _require_str(turn, "value", where)
        messages.append({"role": _SHAREGPT_ROLES[speaker], "content": r.content(value, where)})
    return r.finish(messages)


# LLaVA JSON is ShareGPT with the image(s) under `image`; `_row_images` looks there when `images` is absent.
register_format("llava")(_sharegpt)


@register_format("alpaca")
def _alpaca(r: _Row) -> Conversation:
    row = r.row
    instruction = _require_str(row, "instruction", "the row")
    output = _require_str(row, "output", "the row")
    extra = _optional_str(row, "input")
    system = _optional_str(row, "system")
    for key, value in (("instruction", instruction), ("output", output)):
        # Checked here, not left to check_conversation, so the message names the alpaca field.
        if not value.strip():
            raise BadRow("empty_content", f"field {key!r} is empty; expected non-empty text")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    # A blank system column is common in alpaca exports and means "no system prompt", not a broken row.
    head = [("system", system)] if system.strip() else []
    turns = [*head, ("user", prompt), ("assistant", output)]
    return Conversation([{"role": role, "content": [{"type": "text", "text": t}]} for role, t in turns])


def _require(obj: Mapping[str, Any], key: str, kind: type, expected: str) -> Any:
    # Arrow fills a key absent from some rows with None, so None reads as missing, like an absent key.
    value = obj.get(key)
    if value is None:
        keys = ", ".join(repr(k) for k, v in obj.items() if v is not None) or "none"
        raise BadRow("missing_key", f"missing key {key!r} (keys present: {keys}); expected {expected}")
    if not isinstance(value, kind):
        raise BadRow("wrong_type", f"{key!r} is {_json_type(value)}; expected {expected}")
    return value


def _require_str(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if value is None:
        raise BadRow("missing_key", f"{where} has no {key!r}; expected a string")
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"{where} {key!r} is {_json_type(value)}; expected a string")
    return value


def _optional_str(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"{key!r} is {_json_type(value)}; expected a string")
    return value


def _as_object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise BadRow("wrong_type", f"{where} is {_json_type(value)}; expected an object")
    return value


def _json_type(value: Any) -> str:
    """The JSON name of `value`'s type: users wrote JSON, not Python."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


# The preference and prompt readers register themselves on import; they build on the helpers above.
from vlmtune.data import prompt_formats  # noqa: E402, F401
