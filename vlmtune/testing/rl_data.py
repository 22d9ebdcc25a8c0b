"""Deterministic data sets for preference tuning (DPO) and GRPO tests and demos, generated offline.

Three generators, each a pure function of its arguments (same seed, same rows and the same image bytes):

- `arithmetic_rows`: `prompt` rows, a question such as "What is 7 + 5?" with its `solution` ("12"), for GRPO with
  the `format` and `accuracy` rewards;
- `write_box_set`: a referring-box set, PNG images of varied, non-square sizes, each with one coloured shape
  (rectangle, circle or triangle) on a plain background; the prompt names the shape and its colour and asks for
  its bounding box, and `solution` is that box `[x1, y1, x2, y2]` in the original image's pixels (x2, y2
  exclusive: the box's width is x2 - x1), for GRPO with the `iou` reward. `write_shape_pairs` writes preference
  pairs over the same kind of images (chosen names the shape, rejected another) for a vision-language DPO run;
- `preference_rows`: preference pairs about fictional facts (the capitals of fictional countries): chosen states
  the true capital, rejected a wrong one. `held_out=True` phrases questions and answers in ways the training
  pairs never use, so held-out accuracy measures the fact learnt, not the wording.

Rows are written as jsonl (`write_jsonl`); image paths are relative to the jsonl's folder, where the data
pipeline looks for them by default.

    python -m vlmtune.testing.rl_data arithmetic OUT.jsonl [--n 64] [--seed 0]
    python -m vlmtune.testing.rl_data boxes OUT_DIR [--n 32] [--seed 0]     # OUT_DIR/data.jsonl + images/
    python -m vlmtune.testing.rl_data preference OUT.jsonl [--n 64] [--seed 0] [--held-out]
    python -m vlmtune.testing.rl_data shape-pairs OUT_DIR [--n 32] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

# The instruction the GRPO demos append, so that the `format` reward's default pattern can be met.
FORMAT_INSTRUCTION = (
    "Think briefly inside <think> </think>, then give only the final answer inside <answer> </answer>."
)
BOX_INSTRUCTION = (
    "Output its bounding box as [x1, y1, x2, y2] in pixels. "
    "Think inside <think> </think>, then give the box inside <answer> </answer>."
)

SHAPES = ("rectangle", "circle", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (130, 40, 170),
    "orange": (245, 130, 20),
}
# Light, plain backgrounds, far from every shape colour.
BACKGROUNDS = ((255, 255, 255), (235, 235, 235), (245, 240, 225), (225, 235, 245))

# (country, capital): fictional, so a base model has no prior and held-out accuracy starts near chance.
FACTS = (
    ("Veloria", "Quenmarsh"),
    ("Ostrand", "Belvik"),
    ("Kaldor", "Myrrhen"),
    ("Sarnesse", "Tollenby"),
)
# Wrong answers: fictional cities that are no country's capital here.
DISTRACTORS = ("Tarsk", "Loden", "Fennick", "Brisa", "Norvale", "Halbury", "Cresmoor", "Dunwick")

_TRAIN_QUESTIONS = (
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "Name the capital of {country}.",
)
_TRAIN_ANSWERS = ("The capital of {country} is {city}.", "{city} is the capital of {country}.", "{city}.")
_HELD_OUT_QUESTIONS = (
    "Tell me the capital city of {country}.",
    "If I fly to the capital of {country}, which city do I land in?",
    "{country} is governed from which city?",
)
_HELD_OUT_ANSWERS = ("It is {city}.", "You land in {city}, the capital of {country}.", "From {city}.")


def arithmetic_rows(
    n: int,
    *,
    seed: int = 0,
    max_operand: int = 20,
    ops: str = "+-",
    instruction: str | None = FORMAT_INSTRUCTION,
    system: bool = False,
) -> list[dict[str, Any]]:
    """`prompt` rows asking one arithmetic question each, with its `solution` as a string.

    Args:
        n: Number of rows.
        seed: Same seed, same rows.
        max_operand: Operands are drawn from [0, max_operand]; a subtraction never goes below zero.
        ops: The operators to draw from, any of `+-*`.
        instruction: Appended to the question (or, with `system`, the system message); None for the bare question.
        system: Write the prompt as messages, the instruction as a system message, instead of one string.

    Returns:
        Rows `{"prompt": ..., "solution": "12"}`.
    """
    if not ops or set(ops) - set("+-*"):
        raise ValueError(f"ops must be a non-empty string of '+', '-' and '*'; got {ops!r}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        op = rng.choice(ops)
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if op == "-" and b > a:
            a, b = b, a
        value = a + b if op == "+" else a - b if op == "-" else a * b
        question = f"What is {a} {op} {b}?"
        prompt: Any
        if system and instruction:
            prompt = [{"role": "system", "content": instruction}, {"role": "user", "content": question}]
        elif system:
            prompt = [{"role": "user", "content": question}]
        else:
            prompt = f"{question} {instruction}" if instruction else question
        rows.append({"prompt": prompt, "solution": str(value)})
    return rows


def preference_rows(n: int, *, seed: int = 0, held_out: bool = False) -> list[dict[str, str]]:
    """Preference pairs about the fictional capitals in `FACTS`.

    Args:
        n: Number of pairs; the facts are cycled so each appears about equally often.
        seed: Same seed, same pairs.
        held_out: Use the held-out phrasings (questions and answers no training pair uses).

    Returns:
        Rows `{"prompt", "chosen", "rejected"}` (strings: one user turn, one assistant turn each).
    """
    rng = random.Random(seed)
    questions, answers = (
        (_HELD_OUT_QUESTIONS, _HELD_OUT_ANSWERS) if held_out else (_TRAIN_QUESTIONS, _TRAIN_ANSWERS)
    )
    rows = []
    for i in range(n):
        country, capital = FACTS[i % len(FACTS)]
        answer = rng.choice(answers)
        wrong = rng.choice(DISTRACTORS)
        rows.append(
            {
                "prompt": rng.choice(questions).format(country=country),
                "chosen": answer.format(country=country, city=capital),
                "rejected": answer.format(country=country, city=wrong),
            }
        )
    return rows


@dataclass(frozen=True)
class Shape:
    """One drawn shape: what it is and its box `[x1, y1, x2, y2]` in pixels, x2 and y2 exclusive."""

    kind: str
    colour: str
    box: tuple[int, int, int, int]


def draw_shape_image(
    rng: random.Random, *, min_side: int = 200, max_side: int = 640, kind: str | None = None
) -> tuple[Image.Image, Shape]:
    """An RGB image of a random non-square size with one shape of a random colour on a plain background.

    The shape spans 20-60% of each side; its box is computed from the geometry, not read back from the pixels.
    """
    width = rng.randint(min_side, max_side)
    height = rng.randint(min_side, max_side)
    while height == width:
        height = rng.randint(min_side, max_side)
    kind = kind or rng.choice(SHAPES)
    colour = rng.choice(sorted(COLOURS))
    image = Image.new("RGB", (width, height), rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    if kind == "circle":
        side = rng.randint(int(0.2 * min(width, height)), int(0.6 * min(width, height)))
        w = h = side
    else:
        w = rng.randint(int(0.2 * width), int(0.6 * width))
        h = rng.randint(int(0.2 * height), int(0.6 * height))
    x1, y1 = rng.randint(0, width - w), rng.randint(0, height - h)
    # PIL's rectangle and ellipse include both corners, so the last pixel is x1 + w - 1.
    corners = (x1, y1, x1 + w - 1, y1 + h - 1)
    if kind == "rectangle":
        draw.rectangle(corners, fill=COLOURS[colour])
    elif kind == "circle":
        draw.ellipse(corners, fill=COLOURS[colour])
    elif kind == "triangle":
        apex = x1 + rng.randint(0, w - 1)
        draw.polygon([(apex, y1), (x1, y1 + h - 1), (x1 + w - 1, y1 + h - 1)], fill=COLOURS[colour])
    else:
        raise ValueError(f"unknown shape {kind!r}; known: {', '.join(SHAPES)}")
    return image, Shape(kind, colour, (x1, y1, x1 + w, y1 + h))


def box_prompt(shape: Shape) -> list[dict[str, Any]]:
    """The referring prompt for `shape`: one user turn, the image first, then the question."""
    text = f"Find the {shape.colour} {shape.kind} in the image. {BOX_INSTRUCTION}"
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def write_box_set(
    out_dir: str | Path,
    n: int,
    *,
    seed: int = 0,
    min_side: int = 200,
    max_side: int = 640,
    name: str = "data.jsonl",
) -> Path:
    """Write a referring-box set: `out_dir/images/NNNN.png` and `out_dir/<name>` with one `prompt` row per image.

    Each row is `{"images": ["images/NNNN.png"], "prompt": [user turn], "solution": [x1, y1, x2, y2],
    "shape": ..., "colour": ...}`: the box is in the original image's pixels.

    Returns:
        The jsonl's path.
    """
    out = Path(out_dir)
    rng = random.Random(seed)
    rows = []
    for i, (rel, shape) in enumerate(_write_images(out, n, rng, min_side, max_side)):
        rows.append(
            {
                "images": [rel],
                "prompt": box_prompt(shape),
                "solution": list(shape.box),
                "shape": shape.kind,
                "colour": shape.colour,
                "id": i,
            }
        )
    return write_jsonl(out / name, rows)


def write_shape_pairs(
    out_dir: str | Path,
    n: int,
    *,
    seed: int = 0,
    min_side: int = 200,
    max_side: int = 640,
    name: str = "pairs.jsonl",
) -> Path:
    """Write image preference pairs: chosen names the image's shape and colour, rejected a wrong shape.

    Rows are `{"images": ["images/NNNN.png"], "prompt": [user turn], "chosen": "A red circle.", "rejected": ...}`.

    Returns:
        The jsonl's path.
    """
    out = Path(out_dir)
    rng = random.Random(seed)
    rows = []
    for rel, shape in _write_images(out, n, rng, min_side, max_side):
        wrong = rng.choice([s for s in SHAPES if s != shape.kind])
        question = [
            {"type": "image"},
            {"type": "text", "text": "What shape is in the image, and what colour?"},
        ]
        rows.append(
            {
                "images": [rel],
                "prompt": [{"role": "user", "content": question}],
                "chosen": f"A {shape.colour} {shape.kind}.",
                "rejected": f"A {shape.colour} {wrong}.",
            }
        )
    return write_jsonl(out / name, rows)


def _write_images(
    out: Path, n: int, rng: random.Random, min_side: int, max_side: int
) -> Iterable[tuple[str, Shape]]:
    (out / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        # Cycle the shapes so that every set of three or more holds each of them.
        image, shape = draw_shape_image(
            rng, min_side=min_side, max_side=max_side, kind=SHAPES[i % len(SHAPES)]
        )
        rel = f"images/{i:04d}.png"
        image.save(out / rel, format="PNG")
        yield rel, shape


def write_jsonl(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write `rows` as jsonl (UTF-8, one object a line), creating the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vlmtune.testing.rl_data", description="Write a generated DPO / GRPO data set."
    )
    sub = parser.add_subparsers(dest="kind", required=True)
    for kind, default_n in (("arithmetic", 64), ("boxes", 32), ("preference", 64), ("shape-pairs", 32)):
        p = sub.add_parser(kind)
        p.add_argument("out", type=Path, help="a .jsonl file, or for boxes / shape-pairs a folder")
        p.add_argument("--n", type=int, default=default_n)
        p.add_argument("--seed", type=int, default=0)
        if kind == "preference":
            p.add_argument("--held-out", action="store_true", help="phrasings the training pairs never use")
    args = parser.parse_args(argv)
    if args.kind == "arithmetic":
        path = write_jsonl(args.out, arithmetic_rows(args.n, seed=args.seed))
    elif args.kind == "preference":
        path = write_jsonl(args.out, preference_rows(args.n, seed=args.seed, held_out=args.held_out))
    elif args.kind == "boxes":
        path = write_box_set(args.out, args.n, seed=args.seed)
    else:
        path = write_shape_pairs(args.out, args.n, seed=args.seed)
    print(path)


if __name__ == "__main__":
    main()
