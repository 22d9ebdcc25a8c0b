"""The row formats of preference tuning and RL: `preference` (DPO) and `prompt` (GRPO), TRL's layouts.

- `preference`: `prompt`, `chosen`, `rejected`, each a string or a list of messages (a string prompt is one user
  turn, a string reply one assistant turn), optional `images`. Without `prompt`, `chosen` and `rejected` are
  whole conversations, and the turns they share (up to the first reply) are the prompt, as TRL's implicit-prompt
  rows. The row becomes a `Pair`: prompt + chosen and prompt + rejected, each a conversation whose prompt turns
  are never trained, both with the row's images.
- `prompt`: `prompt` (a string or messages), optional `images`, any other fields (what rewards read): a
  conversation ending on the prompt, encoded with the generation prompt and nothing trained.

Images belong to the prompt: `<image>` placeholders or image parts in it take the row's images in order; a
prompt with neither shows all the row's images before the text of its first user message (as TRL does). A reply
holding an image is a bad row.
"""

from __future__ import annotations

import copy
from typing import Any

from vlmtune.data.bad_rows import BadRow
from vlmtune.data.formats import (
    Conversation,
    Message,
    Pair,
    _as_object,
    _json_type,
    _require_str,
    _Row,
    register_format,
)

_EXPECTED = "a string or a list of messages"


@register_format("preference")
def _preference(r: _Row) -> Pair:
    row = r.row
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            keys = ", ".join(repr(k) for k, v in row.items() if v is not None) or "none"
            raise BadRow(
                "missing_key",
                f"missing key {key!r} (keys present: {keys}); expected a preference row with 'prompt', 'chosen' "
                "and 'rejected'",
            )
    if row.get("prompt") is None:
        return _implicit_prompt(r)
    prompt = _turns(r, row["prompt"], "prompt", "user")
    _place_unplaced_images(r, prompt)
    chosen = _completion(r, row["chosen"], "chosen")
    rejected = _completion(r, row["rejected"], "rejected")
    images = r.finish(prompt).images
    return Pair(
        Conversation([*prompt, *chosen], list(images), prompt_turns=len(prompt)),
        Conversation([*prompt, *rejected], list(images), prompt_turns=len(prompt)),
    )


@register_format("prompt")
def _prompt(r: _Row) -> Conversation:
    if r.row.get("prompt") is None:
        keys = ", ".join(repr(k) for k, v in r.row.items() if v is not None) or "none"
        raise BadRow(
            "missing_key", f"missing key 'prompt' (keys present: {keys}); expected a prompt: {_EXPECTED}"
        )
    messages = _turns(r, r.row["prompt"], "prompt", "user")
    _place_unplaced_images(r, messages)
    conversation = r.finish(messages)
    conversation.generation_prompt = True
    conversation.prompt_turns = len(messages)  # all prompt: an earlier reply in it is never trained
    return conversation


def prompt_as_written(value: Any) -> Any:
    """A prompt row's `prompt` as the row wrote it, for rewards and logs: a string as is, messages with each image
    part reduced to `{"type": "image"}` (the image itself may be a path, bytes or a PIL image) and the keys an
    Arrow table fills with null left out."""
    if not isinstance(value, list):
        return value
    messages = []
    for message in value:
        message = {k: v for k, v in message.items() if v is not None}
        if isinstance(message.get("content"), list):
            message["content"] = [_part_as_written(p) for p in message["content"]]
        messages.append(message)
    return messages


def row_columns(row: Any, image_key: str | None = None) -> dict[str, Any]:
    """A prompt row's other fields (what rewards read: `solution`, ...), copied: the prompt and the image column
    are left out (the model gets the images; rewards get `image_sizes`)."""
    left_out = {"prompt", *((image_key,) if image_key else ("images", "image"))}
    return {key: copy.deepcopy(value) for key, value in row.items() if key not in left_out}


def _part_as_written(part: Any) -> Any:
    if not isinstance(part, dict):
        return part
    if part.get("type") == "image":
        return {"type": "image"}
    return {k: v for k, v in part.items() if v is not None}


def _turns(r: _Row, value: Any, key: str, role: str) -> list[Message]:
    """The messages under `key`: a string is one `role` turn."""
    if isinstance(value, str):
        if not value.strip():
            raise BadRow("empty_content", f"field {key!r} is empty; expected non-empty text")
        return [{"role": role, "content": r.content(value, f"field {key!r}")}]
    if not isinstance(value, list):
        raise BadRow("wrong_type", f"{key!r} is {_json_type(value)}; expected {_EXPECTED}")
    if not value:
        raise BadRow("empty_content", f"field {key!r} is an empty list; expected {_EXPECTED}")
    messages = []
    for i, turn in enumerate(value):
        where = f"{key!r} message {i}"
        turn = _as_object(turn, where)
        messages.append(
            {"role": _require_str(turn, "role", where), "content": r.content(turn.get("content"), where)}
        )
    return messages


def _completion(r: _Row, value: Any, key: str) -> list[Message]:
    """A reply after the prompt: images are not allowed in it."""
    images = len(r.images)
    messages = _turns(r, value, key, "assistant")
    if len(r.images) != images:
        raise BadRow("image_not_in_user_turn", f"{key!r} holds an image; expected images only in the prompt")
    if messages[0]["role"] != "assistant":
        raise BadRow(
            "role_order",
            f"{key!r} starts with role {messages[0]['role']!r}; expected the reply to start with the assistant",
        )
    return messages


def _implicit_prompt(r: _Row) -> Pair:
    """`chosen` and `rejected` as whole conversations: the prompt is their shared turns before the first reply
    that differs."""
    row = r.row
    for key in ("chosen", "rejected"):
        if not isinstance(row[key], list):
            raise BadRow(
                "missing_key",
                f"missing key 'prompt', and {key!r} is {_json_type(row[key])}; expected a 'prompt', or 'chosen' and "
                "'rejected' as whole conversations that share their prompt turns",
            )
    sides = []
    for key in ("chosen", "rejected"):
        reader = _Row(row, r.vision, None)
        reader.pending = r.pending  # the row's images, taken anew by each side
        messages = _turns(reader, row[key], key, "assistant")
        _place_unplaced_images(reader, messages)
        sides.append(reader.finish(messages))
    chosen, rejected = sides
    shared = 0
    while (
        shared < min(len(chosen.messages), len(rejected.messages))
        and chosen.messages[shared] == rejected.messages[shared]
    ):
        shared += 1
    # The replies start at an assistant turn: a shared assistant turn at the end of the prefix is a reply.
    while shared and chosen.messages[shared - 1]["role"] == "assistant":
        shared -= 1
    if not any(m["role"] == "user" for m in chosen.messages[:shared]):
        raise BadRow(
            "missing_key",
            "missing key 'prompt', and 'chosen' and 'rejected' share no opening turns to take as the prompt; "
            "expected a 'prompt', or the same prompt turns at the start of both",
        )
    for key, side in zip(("chosen", "rejected"), sides, strict=True):
        if any(p["type"] == "image" for m in side.messages[shared:] for p in m["content"]):
            raise BadRow(
                "image_not_in_user_turn",
                f"{key!r} holds an image after the prompt; expected images only in the prompt",
            )
        side.prompt_turns = shared
    return Pair(chosen, rejected)


def _place_unplaced_images(r: _Row, messages: list[Message]) -> None:
    """A prompt that places none of the row's images shows them all first in its first user message."""
    if not r.pending or r.taken or r.images:
        return
    first = next((m for m in messages if m["role"] == "user"), None)
    if first is None:
        return  # the conversation checks name the missing user turn
    parts = []
    while r.taken < len(r.pending):
        r.images.append(r.take())
        parts.append({"type": "image"})
    first["content"] = [*parts, *first["content"]]
