"""Row formats normalise to the same messages, text and image-text alike, and every broken row is named by kind
and problem."""

from __future__ import annotations

import io
import typing

import pytest
from PIL import Image

from vlmtune.config.schema import DataSource
from vlmtune.data.bad_rows import BAD_ROW_KINDS, BadRow, BadRowTracker
from vlmtune.data.formats import FORMATS, flat_text, normalise
from vlmtune.errors import DataError

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
        for vision in (False, True):
            assert normalise(raw, fmt, vision=vision).text_messages() == EXPECTED, fmt


def test_sharegpt_accepts_user_and_assistant_speakers():
    raw = {"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]}

    assert normalise(raw, "sharegpt").text_messages() == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]


def test_alpaca_without_input_or_system_is_one_exchange():
    # A None system is what Arrow gives a column absent from this row; a blank one means "no system prompt".
    for system in (None, "", "  "):
        raw = {"instruction": "Say hi.", "input": "", "output": "hi", "system": system}
        assert normalise(raw, "alpaca").text_messages() == [
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "hi"},
        ]


def test_registry_matches_the_recipe_schema():
    allowed = typing.get_args(DataSource.model_fields["format"].annotation)
    assert set(FORMATS) == set(allowed)


def test_a_text_model_reads_image_placeholders_as_text():
    raw = {
        "messages": [{"role": "user", "content": "<image> is a tag"}, {"role": "assistant", "content": "ok"}]
    }
    conversation = normalise(raw | {"images": ["a.png"]}, "messages", vision=False)
    assert conversation.images == [] and conversation.text_messages()[0]["content"] == "<image> is a tag"
    with pytest.raises(BadRow, match="not a vision-language model"):
        normalise({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "messages", vision=False)


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
        normalise(raw, fmt, vision=False)

    assert caught.value.kind == kind
    assert problem in caught.value.problem
    assert "expected" in caught.value.problem


def test_every_row_kind_but_pipeline_ones_is_exercised_here():
    # unparsable, template_error, no_trained_tokens and images_required come from reading and encoding: tested
    # with the dataset and the encoder.
    exercised = {b[2] for b in BAD_ROWS} | {kind for _, kind in MALFORMED} | {"image_count_mismatch"}
    assert exercised == set(BAD_ROW_KINDS) - {
        "unparsable",
        "template_error",
        "no_trained_tokens",
        "images_required",
    }


def _reply(text: str = "A red square.") -> dict:
    return {"role": "assistant", "content": text}


def test_messages_with_content_parts_keep_order_and_inline_images() -> None:
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "a.png"},
                    {"type": "text", "text": "and"},
                    {"type": "image", "image": "b.png"},
                ],
            },
            _reply(),
        ]
    }
    conv = normalise(row, "messages")
    assert conv.images == ["a.png", "b.png"]
    assert conv.messages[1]["content"] == [
        {"type": "image"},
        {"type": "text", "text": "and"},
        {"type": "image"},
    ]
    assert conv.messages[2]["content"] == [{"type": "text", "text": "A red square."}]
    assert flat_text(conv.messages[1]) == "<image>and<image>"


@pytest.mark.parametrize("fmt", ["messages", "sharegpt"])
def test_placeholders_take_the_top_level_images_in_order(fmt: str) -> None:
    turns = [("user", "<image>\nLeft, <image> right?"), ("assistant", "Both red.")]
    if fmt == "messages":
        row = {"messages": [{"role": r, "content": c} for r, c in turns]}
    else:
        row = {
            "conversations": [
                {"from": {"user": "human", "assistant": "gpt"}[r], "value": c} for r, c in turns
            ]
        }
    row["images"] = ["l.png", "r.png"]
    conv = normalise(row, fmt)
    assert conv.images == ["l.png", "r.png"]
    assert conv.messages[0]["content"] == [
        {"type": "image"},
        {"type": "text", "text": "Left,"},
        {"type": "image"},
        {"type": "text", "text": "right?"},
    ]


@pytest.mark.parametrize("image", ["coco/1.jpg", ["coco/1.jpg"]])
def test_llava_json(image: str | list[str]) -> None:
    row = {
        "id": "000001",
        "image": image,
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"},
            {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Colour?"},
            {"from": "gpt", "value": "Grey."},
        ],
    }
    conv = normalise(row, "llava")
    assert conv.images == ["coco/1.jpg"]
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "user", "assistant"]
    assert conv.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What is shown?"}]


def test_text_only_rows_mix_in() -> None:
    conv = normalise({"messages": [{"role": "user", "content": "hi"}, _reply("hello")]}, "messages")
    assert conv.images == []
    assert conv.messages[0]["content"] == [{"type": "text", "text": "hi"}]


def test_a_datasets_image_column(tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    paths = []
    for name, colour in (("red.png", (255, 0, 0)), ("blue.png", (0, 0, 255))):
        Image.new("RGB", (8, 8), colour).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    chat = [{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": "A colour."}]
    table = datasets.Dataset.from_dict({"image": paths, "conversations": [chat, chat]})
    decoded = [normalise(r, "llava") for r in table.cast_column("image", datasets.Image())]
    assert all(isinstance(c.images[0], Image.Image) for c in decoded)
    raw = [normalise(r, "llava") for r in table.cast_column("image", datasets.Image(decode=False))]
    assert set(raw[1].images[0]) == {"bytes", "path"}
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    as_bytes = normalise(
        {"image": {"bytes": buffer.getvalue(), "path": None}, "conversations": chat}, "llava"
    )
    assert as_bytes.images == [{"bytes": buffer.getvalue(), "path": None}]


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        (
            {"messages": [{"role": "user", "content": "<image>x"}, _reply()], "images": []},
            "1 <image> placeholder",
        ),
        ({"messages": [{"role": "user", "content": "x"}, _reply()], "images": ["a.png"]}, "gives 1 image"),
        (
            {"messages": [{"role": "user", "content": "<image><image>x"}, _reply()], "images": ["a.png"]},
            "2 <image> placeholder",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]},
                    _reply(),
                ],
            },
            "0 image(s)",
        ),
    ],
)
def test_placeholder_and_image_counts_must_match(row: dict, fragment: str) -> None:
    with pytest.raises(BadRow) as info:
        normalise(row, "messages")
    assert info.value.kind == "image_count_mismatch"
    assert fragment in info.value.problem


def test_images_only_in_user_turns_and_conversation_rules_still_apply() -> None:
    row = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "<image>y"}]}
    with pytest.raises(BadRow) as info:
        normalise({**row, "images": ["a.png"]}, "messages")
    assert info.value.kind == "image_not_in_user_turn"
    with pytest.raises(BadRow) as info:
        normalise({"messages": [{"role": "user", "content": "<image>"}], "images": ["a.png"]}, "messages")
    assert info.value.kind == "no_assistant_turn"
    # An image alone is a prompt: not "empty content".
    assert normalise(
        {"messages": [{"role": "user", "content": "<image>"}, _reply()], "images": ["a.png"]}, "messages"
    ).images == ["a.png"]


MALFORMED = [
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}, _reply()]}, "wrong_type"),
    ({"messages": [{"role": "user", "content": 3}, _reply()]}, "wrong_type"),
    ({"messages": [{"role": "user"}, _reply()]}, "missing_key"),
    ({"messages": [{"role": "user", "content": "x"}, _reply()], "images": 3}, "wrong_type"),
    ({"messages": [{"role": "user", "content": "<image>x"}, _reply()], "images": [None]}, "bad_image"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "unknown_role"),
    (
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "<image>y"}]}
        | {"images": ["a.png"]},
        "image_not_in_user_turn",
    ),
]


@pytest.mark.parametrize(("row", "kind"), MALFORMED)
def test_malformed_rows(row: dict, kind: str) -> None:
    fmt = "sharegpt" if "conversations" in row else "messages"
    with pytest.raises(BadRow) as info:
        normalise(row, fmt)
    assert info.value.kind == kind


def test_image_bad_rows_are_counted_by_the_tracker() -> None:
    tracker = BadRowTracker("skip", 1.0)
    tracker.handle(BadRow("image_count_mismatch", "p"), "f.jsonl row 2")
    assert tracker.counts == {"image_count_mismatch": 1}
    with pytest.raises(DataError, match=r"f\.jsonl row 2: p"):
        BadRowTracker("raise", 0.0).handle(BadRow("bad_image", "p"), "f.jsonl row 2")
    with pytest.raises(ValueError):
        BadRow("no_such_kind", "p")
