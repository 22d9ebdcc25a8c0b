"""Row formats normalise to the same messages, and every broken row is named by kind and problem."""

from __future__ import annotations

import typing

import pytest

from vlmtune.config.schema import DataSource
from vlmtune.data.bad_rows import BAD_ROW_KINDS, VLM_BAD_ROW_KINDS, BadRow
from vlmtune.data.formats import FORMATS, normalise

EXPECTED = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
    {"role": "assistant", "content": "5"},
]


def test_every_format_normalises_to_the_same_messages():
    rows = {
        "messages": {"messages": EXPECTED, "id": 7},
        "sharegpt": {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Add the numbers.\n\n2 and 3"},
                {"from": "gpt", "value": "5"},
            ]
        },
        "alpaca": {
            "system": "Be brief.",
            "instruction": "Add the numbers.",
            "input": "2 and 3",
            "output": "5",
        },
    }

    for fmt, raw in rows.items():
        assert normalise(raw, fmt) == EXPECTED, fmt


def test_sharegpt_accepts_user_and_assistant_speakers():
    raw = {"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]}

    assert normalise(raw, "sharegpt") == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]


def test_alpaca_without_input_or_system_is_one_exchange():
    # A None system is what Arrow gives a column absent from this row; a blank one means "no system prompt".
    for system in (None, "", "  "):
        raw = {"instruction": "Say hi.", "input": "", "output": "hi", "system": system}
        assert normalise(raw, "alpaca") == [
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "hi"},
        ]


def test_registry_matches_the_recipe_schema():
    allowed = typing.get_args(DataSource.model_fields["format"].annotation)

    from vlmtune.data.vlm_formats import VLM_FORMATS

    # Text formats, and the image-text ones (llava) that only vision-language models read.
    assert set(FORMATS) | set(VLM_FORMATS) == set(allowed)


def _m(*pairs: tuple[str, object]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in pairs]}


BAD_ROWS = [
    ("messages", {"text": "hi"}, "missing_key", "missing key 'messages' (keys present: 'text')"),
    ("messages", {"messages": [{"role": "user"}]}, "missing_key", "message 0 has no 'content'"),
    ("messages", {"messages": "hi"}, "wrong_type", "'messages' is a string"),
    ("messages", _m(("user", "q"), ("assistant", 5)), "wrong_type", "message 1 'content' is a number (5)"),
    ("messages", {"messages": ["hi"]}, "wrong_type", "message 0 is a string; expected an object"),
    ("messages", ["not", "an", "object"], "wrong_type", "the row is a list; expected a JSON object"),
    ("messages", {"messages": []}, "empty_conversation", "the conversation is empty"),
    ("messages", _m(("user", "q"), ("bot", "a")), "unknown_role", "message 1 has unknown role 'bot'"),
    ("messages", _m(("system", "s"), ("user", "q")), "no_assistant_turn", "no assistant message"),
    (
        "messages",
        _m(("system", "s"), ("user", "q"), ("user", "q2"), ("assistant", "a")),
        "role_order",
        "message 2 has role 'user' after 'user'; expected user/assistant turns alternating, starting with user",
    ),
    (
        "messages",
        _m(("assistant", "a"), ("user", "q")),
        "role_order",
        "message 0 has role 'assistant' at the start",
    ),
    (
        "messages",
        _m(("user", "q"), ("system", "s"), ("assistant", "a")),
        "role_order",
        "message 1 has role 'system'",
    ),
    ("messages", _m(("user", "q"), ("assistant", "a"), ("user", "q2")), "role_order", "the last message (2)"),
    (
        "messages",
        _m(("user", " \n"), ("assistant", "a")),
        "empty_content",
        "message 0 (user) has empty content",
    ),
    (
        "sharegpt",
        {"conversations": [{"from": "tool", "value": "x"}]},
        "unknown_role",
        "message 0 is from 'tool'",
    ),
    ("sharegpt", {"conversations": [{"from": "human"}]}, "missing_key", "message 0 has no 'value'"),
    ("alpaca", {"instruction": "q"}, "missing_key", "the row has no 'output'"),
    ("alpaca", {"instruction": "q", "output": "  "}, "empty_content", "field 'output' is empty"),
    ("alpaca", {"instruction": "q", "input": 3, "output": "a"}, "wrong_type", "'input' is a number (3)"),
]


@pytest.mark.parametrize(
    ("fmt", "raw", "kind", "problem"), BAD_ROWS, ids=[f"{b[0]}-{b[2]}" for b in BAD_ROWS]
)
def test_bad_rows_are_named_by_kind_and_problem(fmt, raw, kind, problem):
    with pytest.raises(BadRow) as caught:
        normalise(raw, fmt)

    assert caught.value.kind == kind
    assert problem in caught.value.problem
    assert "expected" in caught.value.problem


def test_every_row_kind_but_pipeline_ones_is_exercised_here():
    # unparsable, template_error and no_trained_tokens come from reading and tokenising, the image kinds from
    # image-text rows: tested elsewhere.
    assert {b[2] for b in BAD_ROWS} == set(BAD_ROW_KINDS) - set(VLM_BAD_ROW_KINDS) - {
        "unparsable",
        "template_error",
        "no_trained_tokens",
    }
