"""The DPO / GRPO data generators: deterministic, correct solutions, tight boxes, held-out phrasing disjoint."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from vlmtune.testing import rl_data
from vlmtune.testing.rl_data import (
    COLOURS,
    FACTS,
    SHAPES,
    arithmetic_rows,
    draw_shape_image,
    preference_rows,
    write_box_set,
    write_shape_pairs,
)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_arithmetic_solutions_are_the_answers() -> None:
    rows = arithmetic_rows(200, seed=3, ops="+-*")
    assert rows == arithmetic_rows(200, seed=3, ops="+-*")
    assert rows != arithmetic_rows(200, seed=4, ops="+-*")
    seen_ops = set()
    for row in rows:
        a, op, b = re.match(r"What is (\d+) ([-+*]) (\d+)\?", row["prompt"]).groups()
        seen_ops.add(op)
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert row["solution"] == str(expected) and expected >= 0
        assert rl_data.FORMAT_INSTRUCTION in row["prompt"]
    assert seen_ops == {"+", "-", "*"}


def test_arithmetic_as_messages_and_bad_ops() -> None:
    row = arithmetic_rows(1, system=True)[0]
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert row["prompt"][1]["content"].startswith("What is ")
    assert arithmetic_rows(1, instruction=None)[0]["prompt"].endswith("?")
    with pytest.raises(ValueError, match="ops"):
        arithmetic_rows(1, ops="/")


@pytest.mark.parametrize("kind", SHAPES)
def test_shape_box_is_the_tight_box_of_its_pixels(kind: str) -> None:
    rng = random.Random(7)
    for _ in range(15):
        image, shape = draw_shape_image(rng, kind=kind)
        background = Image.new("RGB", image.size, image.getpixel((0, 0)))
        # The corner may be inside the shape; then take the opposite one.
        if image.getpixel((0, 0)) == COLOURS[shape.colour]:
            background = Image.new("RGB", image.size, image.getpixel((image.width - 1, image.height - 1)))
        assert ImageChops.difference(image, background).getbbox() == shape.box, (kind, image.size)
        assert image.width != image.height and 200 <= min(image.size) <= max(image.size) <= 640


def test_box_set_rows_images_and_determinism(tmp_path: Path) -> None:
    path = write_box_set(tmp_path / "a", 6, seed=1)
    rows = _read(path)
    assert len(rows) == 6 and {r["shape"] for r in rows} == set(SHAPES)
    sizes = set()
    for row in rows:
        with Image.open(path.parent / row["images"][0]) as image:
            sizes.add(image.size)
            x1, y1, x2, y2 = row["solution"]
            assert 0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height
        user = row["prompt"][0]
        assert user["role"] == "user" and user["content"][0] == {"type": "image"}
        assert f"{row['colour']} {row['shape']}" in user["content"][1]["text"]
    assert len(sizes) == 6
    again = write_box_set(tmp_path / "b", 6, seed=1)
    assert again.read_bytes() == path.read_bytes()
    for i in range(6):
        name = f"images/{i:04d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_shape_pairs_reject_another_shape(tmp_path: Path) -> None:
    rows = _read(write_shape_pairs(tmp_path, 6, seed=2))
    for row in rows:
        assert row["chosen"] != row["rejected"]
        assert row["chosen"].split()[1] == row["rejected"].split()[1]  # same colour, other shape
        assert (tmp_path / row["images"][0]).is_file()


def test_preference_pairs_state_the_fact_and_held_out_phrasing_is_new() -> None:
    train = preference_rows(40, seed=0)
    held = preference_rows(40, seed=0, held_out=True)
    assert train == preference_rows(40, seed=0)
    capitals = dict(FACTS)
    for row in train + held:
        country = next(c for c in capitals if c in row["prompt"])
        assert capitals[country] in row["chosen"] and capitals[country] not in row["rejected"]
        assert not any(city in row["rejected"] for city in capitals.values())
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in held})
    train_answers = {r["chosen"] for r in train}
    assert train_answers.isdisjoint({r["chosen"] for r in held})
    assert {next(c for c in capitals if c in r["prompt"]) for r in train} == set(capitals)


def test_cli_writes_each_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rl_data.main(["arithmetic", str(tmp_path / "arith.jsonl"), "--n", "3"])
    rl_data.main(["preference", str(tmp_path / "pref.jsonl"), "--n", "3", "--held-out"])
    rl_data.main(["boxes", str(tmp_path / "boxes"), "--n", "2"])
    assert len(_read(tmp_path / "arith.jsonl")) == 3
    assert _read(tmp_path / "pref.jsonl") == preference_rows(3, held_out=True)
    assert len(_read(tmp_path / "boxes" / "data.jsonl")) == 2
    assert str(tmp_path / "boxes" / "data.jsonl") in capsys.readouterr().out
