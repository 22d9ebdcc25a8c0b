"""The `preference` and `prompt` row formats (DPO and GRPO): TRL's layouts read into the same conversations as
SFT rows, every broken row named by kind and problem."""

from __future__ import annotations

import pytest

from vlmtune.data.bad_rows import BadRow
from vlmtune.data.formats import Pair, normalise
from vlmtune.data.prompt_formats import prompt_as_written


def _u(text: str) -> dict:
    return {"role": "user", "content": text}


def _a(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_a_string_preference_row_is_one_user_turn_then_each_reply():
    pair = normalise({"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}, "preference")

    assert isinstance(pair, Pair)
    assert pair.chosen.text_messages() == [_u("What is 2+2?"), _a("4")]
    assert pair.rejected.text_messages() == [_u("What is 2+2?"), _a("5")]
    assert pair.chosen.prompt_turns == pair.rejected.prompt_turns == 1


def test_a_message_preference_row_keeps_its_system_and_earlier_turns_as_prompt():
    prompt = [{"role": "system", "content": "Be brief."}, _u("hi"), _a("hello"), _u("2+2?")]
    pair = normalise({"prompt": prompt, "chosen": [_a("4")], "rejected": [_a("5")]}, "preference")

    assert pair.chosen.text_messages() == [*prompt, _a("4")]
    assert pair.rejected.text_messages() == [*prompt, _a("5")]
    assert pair.chosen.prompt_turns == 4


def test_the_implicit_prompt_is_the_shared_opening():
    opening = [_u("hi"), _a("hello"), _u("2+2?")]
    pair = normalise({"chosen": [*opening, _a("4")], "rejected": [*opening, _a("5")]}, "preference")

    assert pair.chosen.text_messages() == [*opening, _a("4")]
    assert pair.rejected.text_messages() == [*opening, _a("5")]
    assert pair.chosen.prompt_turns == pair.rejected.prompt_turns == 3
    # A shared reply is a reply, not prompt: the prompt ends on the user turn before it.
    pair = normalise({"chosen": [*opening[:2], _u("more"), _a("x")], "rejected": opening[:2]}, "preference")
    assert pair.chosen.prompt_turns == pair.rejected.prompt_turns == 1


def test_preference_images_belong_to_the_prompt_and_both_sides():
    row = {
        "prompt": [_u("<image>Which shape?")],
        "chosen": "a square",
        "rejected": "a circle",
        "images": ["a.png"],
    }
    pair = normalise(row, "preference")

    for side in pair.sides():
        assert side.images == ["a.png"]
        assert side.messages[0]["content"][0] == {"type": "image"}
    # What a caller sampling a row's images and text reads (the memory planner): the chosen side.
    assert pair.images == ["a.png"] and pair.messages == pair.chosen.messages
    # Without a placeholder the images come first in the first user turn (as TRL shows them).
    pair = normalise(
        {"prompt": "Which shape?", "chosen": "a", "rejected": "b", "images": ["a.png"]}, "preference"
    )
    assert pair.chosen.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Which shape?"}]
    # A text model reads no image.
    pair = normalise(row, "preference", vision=False)
    assert pair.chosen.images == [] and pair.chosen.text_messages()[0]["content"] == "<image>Which shape?"


def test_an_implicit_prompt_row_places_its_images_in_both_sides():
    opening = [_u("<image>Which shape?")]
    row = {"chosen": [*opening, _a("square")], "rejected": [*opening, _a("circle")], "images": ["a.png"]}
    pair = normalise(row, "preference")

    assert pair.chosen.images == pair.rejected.images == ["a.png"]
    assert pair.chosen.prompt_turns == 1


def test_a_prompt_row_ends_on_the_prompt_and_trains_nothing():
    conversation = normalise({"prompt": "2+2?", "solution": "4"}, "prompt")

    assert conversation.text_messages() == [_u("2+2?")]
    assert conversation.generation_prompt and not conversation.trains

    messages = [{"role": "system", "content": "Think."}, _u("2+2?")]
    assert normalise({"prompt": messages}, "prompt").text_messages() == messages

    row = {"prompt": "Find the red square.", "images": ["a.png"], "solution": [1, 2, 3, 4]}
    conversation = normalise(row, "prompt")
    assert conversation.images == ["a.png"]
    assert conversation.messages[0]["content"][0] == {"type": "image"}
    assert normalise(row, "prompt", vision=False).images == []


def test_the_prompt_as_written_hides_image_data():
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": b"png", "text": None}, {"type": "text", "text": "q"}],
        }
    ]

    assert prompt_as_written("q") == "q"
    assert prompt_as_written(messages) == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}
    ]


_CHAT = [_u("hi"), _a("a")]

BAD_ROWS = [
    (
        "preference",
        {"prompt": "q", "chosen": "a"},
        "missing_key",
        "missing key 'rejected' (keys present: 'prompt', 'chosen')",
    ),
    ("preference", {"prompt": "q", "rejected": "b"}, "missing_key", "missing key 'chosen'"),
    (
        "preference",
        {"prompt": "", "chosen": "a", "rejected": "b"},
        "empty_content",
        "field 'prompt' is empty",
    ),
    (
        "preference",
        {"prompt": "q", "chosen": " ", "rejected": "b"},
        "empty_content",
        "field 'chosen' is empty",
    ),
    (
        "preference",
        {"prompt": "q", "chosen": [], "rejected": "b"},
        "empty_content",
        "field 'chosen' is an empty list",
    ),
    ("preference", {"prompt": 5, "chosen": "a", "rejected": "b"}, "wrong_type", "'prompt' is a number (5)"),
    (
        "preference",
        {"prompt": "q", "chosen": {"a": 1}, "rejected": "b"},
        "wrong_type",
        "'chosen' is an object",
    ),
    (
        "preference",
        {"prompt": "q", "chosen": [_u("x")], "rejected": "b"},
        "role_order",
        "'chosen' starts with role 'user'; expected the reply to start with the assistant",
    ),
    (
        "preference",
        {"prompt": "q", "chosen": "a <image>", "rejected": "b", "images": ["a.png"]},
        "image_not_in_user_turn",
        "'chosen' holds an image",
    ),
    (
        "preference",
        {"chosen": "a", "rejected": "b"},
        "missing_key",
        "missing key 'prompt', and 'chosen' is a string",
    ),
    (
        "preference",
        {"chosen": _CHAT, "rejected": [_u("ho"), _a("b")]},
        "missing_key",
        "'chosen' and 'rejected' share no opening turns",
    ),
    (
        "preference",
        {"prompt": "q", "chosen": [_a("a"), _u("more")], "rejected": "b"},
        "role_order",
        "expected the conversation to end with an assistant reply",
    ),
    ("prompt", {"text": "x"}, "missing_key", "missing key 'prompt' (keys present: 'text')"),
    ("prompt", {"prompt": "  "}, "empty_content", "field 'prompt' is empty"),
    ("prompt", {"prompt": []}, "empty_content", "field 'prompt' is an empty list"),
    ("prompt", {"prompt": ["q"]}, "wrong_type", "'prompt' message 0 is a string; expected an object"),
    ("prompt", {"prompt": [{"role": "user"}]}, "missing_key", "'prompt' message 0 has no 'content'"),
    ("prompt", {"prompt": _CHAT}, "role_order", "expected the conversation to end with a user message"),
    ("prompt", {"prompt": [_u("")]}, "empty_content", "message 0 (user) has empty content"),
    ("prompt", {"prompt": "q", "images": ["a.png", "b.png"]}, None, None),  # both shown first: fine
    (
        "prompt",
        {"prompt": "<image> q", "images": ["a.png", "b.png"]},
        "image_count_mismatch",
        "the row gives 2 image(s) but its text has 1",
    ),
]


@pytest.mark.parametrize(
    ("fmt", "raw", "kind", "problem"), BAD_ROWS, ids=[f"{b[0]}-{b[2]}-{i}" for i, b in enumerate(BAD_ROWS)]
)
def test_bad_rows_are_named_by_kind_and_problem(fmt, raw, kind, problem):
    if kind is None:
        normalise(raw, fmt)
        return
    with pytest.raises(BadRow) as caught:
        normalise(raw, fmt)
    assert caught.value.kind == kind
    assert problem in caught.value.problem
