"""Row formats: each turns one raw row into a list of `{"role", "content"}` messages.

Adding a format is one decorated function here (plus its name in `DataSource.format`). Every normaliser's output
then goes through `check_conversation`, so the conversation rules are written once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from vlmtune.data.bad_rows import BadRow

Message = dict[str, str]
Normaliser = Callable[[Mapping[str, Any]], list[Message]]

ROLES = ("system", "user", "assistant")
_ALTERNATION = "expected user/assistant turns alternating, starting with user"

FORMATS: dict[str, Normaliser] = {}


def register_format(name: str) -> Callable[[Normaliser], Normaliser]:
    """Register `fn` as the normaliser of rows in format `name`."""

    def decorator(fn: Normaliser) -> Normaliser:
        if name in FORMATS:
            raise ValueError(f"data format {name!r} is registered twice")
        FORMATS[name] = fn
        return fn

    return decorator


def normalise(row: Any, fmt: str) -> list[Message]:
    """Turn a raw row into checked messages.

    Args:
        row: One row as read from the file (a JSON object, or a dict from an Arrow table).
        fmt: A name in `FORMATS`.

    Returns:
        The messages: an optional system message, then user/assistant turns, ending with the assistant.

    Raises:
        BadRow: the row does not fit the format or breaks a conversation rule.
    """
    try:
        normaliser = FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown data format {fmt!r}; known: {', '.join(sorted(FORMATS))}") from None
    if not isinstance(row, Mapping):
        raise BadRow("wrong_type", f"the row is {_json_type(row)}; expected a JSON object")
    messages = normaliser(row)
    check_conversation(messages)
    return messages


def check_conversation(messages: list[Message]) -> None:
    """Check the rules every format shares.

    An optional system message comes first, then user and assistant alternate starting with user, and the
    assistant speaks last, so that every trained reply answers a prompt. Message indices in the problems are
    0-based, like row numbers.

    Raises:
        BadRow: naming the first broken rule and what was expected.
    """
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
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow(
            "no_assistant_turn",
            "the conversation has no assistant message; expected at least one assistant reply to train on",
        )
    _check_order(messages)
    for i, message in enumerate(messages):
        if not message["content"].strip():
            raise BadRow(
                "empty_content", f"message {i} ({message['role']}) has empty content; expected non-empty text"
            )


def _check_order(messages: list[Message]) -> None:
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
    if last != "assistant":
        raise BadRow(
            "role_order",
            f"the last message ({len(messages) - 1}) has role {last!r}; "
            "expected the conversation to end with an assistant reply",
        )


@register_format("messages")
def _messages(row: Mapping[str, Any]) -> list[Message]:
    turns = _require(
        row, "messages", list, 'the row to hold {"messages": [{"role": ..., "content": ...}, ...]}'
    )
    out = []
    for i, turn in enumerate(turns):
        where = f"message {i}"
        turn = _as_object(turn, where)
        out.append(
            {"role": _require_str(turn, "role", where), "content": _require_str(turn, "content", where)}
        )
    return out


_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


@register_format("sharegpt")
def _sharegpt(row: Mapping[str, Any]) -> list[Message]:
    turns = _require(
        row, "conversations", list, 'the row to hold {"conversations": [{"from": ..., "value": ...}, ...]}'
    )
    out = []
    for i, turn in enumerate(turns):
        where = f"message {i}"
        turn = _as_object(turn, where)
        speaker = _require_str(turn, "from", where)
        if speaker not in _SHAREGPT_ROLES:
            raise BadRow(
                "unknown_role",
                f"message {i} is from {speaker!r}; expected one of {', '.join(_SHAREGPT_ROLES)}",
            )
        out.append({"role": _SHAREGPT_ROLES[speaker], "content": _require_str(turn, "value", where)})
    return out


@register_format("alpaca")
def _alpaca(row: Mapping[str, Any]) -> list[Message]:
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
    head = [{"role": "system", "content": system}] if system.strip() else []
    return [*head, {"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


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
