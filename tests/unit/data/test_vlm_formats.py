"""Image-text row formats: content parts, placeholders with an image list, LLaVA JSON, datasets image columns."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from vlmtune.data.bad_rows import BadRow, BadRowTracker
from vlmtune.data.vlm_formats import VLM_BAD_ROW_KINDS, VLMBadRow, flat_text, normalise_vlm
from vlmtune.errors import DataError


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
    conv = normalise_vlm(row, "messages")
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
    conv = normalise_vlm(row, fmt)
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
    conv = normalise_vlm(row, "llava")
    assert conv.images == ["coco/1.jpg"]
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "user", "assistant"]
    assert conv.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What is shown?"}]


def test_text_only_rows_mix_in() -> None:
    conv = normalise_vlm({"messages": [{"role": "user", "content": "hi"}, _reply("hello")]}, "messages")
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
    decoded = [normalise_vlm(r, "llava") for r in table.cast_column("image", datasets.Image())]
    assert all(isinstance(c.images[0], Image.Image) for c in decoded)
    raw = [normalise_vlm(r, "llava") for r in table.cast_column("image", datasets.Image(decode=False))]
    assert set(raw[1].images[0]) == {"bytes", "path"}
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    as_bytes = normalise_vlm(
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
    with pytest.raises(VLMBadRow) as info:
        normalise_vlm(row, "messages")
    assert info.value.kind == "image_count_mismatch"
    assert fragment in info.value.problem


def test_images_only_in_user_turns_and_conversation_rules_still_apply() -> None:
    row = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "<image>y"}]}
    with pytest.raises(VLMBadRow) as info:
        normalise_vlm({**row, "images": ["a.png"]}, "messages")
    assert info.value.kind == "image_not_in_user_turn"
    with pytest.raises(BadRow) as info:
        normalise_vlm({"messages": [{"role": "user", "content": "<image>"}], "images": ["a.png"]}, "messages")
    assert info.value.kind == "no_assistant_turn"
    # An image alone is a prompt: not "empty content".
    assert normalise_vlm(
        {"messages": [{"role": "user", "content": "<image>"}, _reply()], "images": ["a.png"]}, "messages"
    ).images == ["a.png"]


@pytest.mark.parametrize(
    ("row", "kind"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "video"}]}, _reply()]}, "wrong_type"),
        ({"messages": [{"role": "user", "content": 3}, _reply()]}, "wrong_type"),
        ({"messages": [{"role": "user"}, _reply()]}, "missing_key"),
        ({"messages": [{"role": "user", "content": "x"}, _reply()], "images": 3}, "wrong_type"),
        ({"messages": [{"role": "user", "content": "<image>x"}, _reply()], "images": [None]}, "bad_image"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "unknown_role"),
    ],
)
def test_malformed_rows(row: dict, kind: str) -> None:
    fmt = "sharegpt" if "conversations" in row else "messages"
    with pytest.raises(BadRow) as info:
        normalise_vlm(row, fmt)
    assert info.value.kind == kind


def test_vlm_bad_rows_are_counted_by_the_tracker() -> None:
    assert {"image_count_mismatch", "bad_image"} <= set(VLM_BAD_ROW_KINDS)
    tracker = BadRowTracker("skip", 1.0)
    tracker.handle(VLMBadRow("image_count_mismatch", "p"), "f.jsonl row 2")
    assert tracker.counts == {"image_count_mismatch": 1}
    with pytest.raises(DataError, match=r"f\.jsonl row 2: p"):
        BadRowTracker("raise", 0.0).handle(VLMBadRow("bad_image", "p"), "f.jsonl row 2")
    with pytest.raises(ValueError):
        VLMBadRow("no_such_kind", "p")
