"""A generated image-text set for the data benchmark: JPEG files + a `messages` JSONL, deterministic per seed.

Row i is a pure function of (seed, i), so the set of N rows is the first N rows of one sequence: the 1k, 10k
and 100k sets share their images (one folder per seed) and differ in their JSONL (`rows-N.jsonl`). A marker file
written last (`rows-N.done`) makes a finished set reusable; a cut-off generation resumes where files exist.

Images: sizes and aspect ratios spread like web photos (long side log-normal around 640 px, clipped to 64–2000;
landscape, portrait, square, panoramas), cheap smooth patterns (a random low-resolution grid scaled up plus a
few shapes), JPEG quality 80: a few tens of KB each, ~2 ms to make. Text: pseudo-words with Zipf-like
frequencies; prompt and reply lengths log-normal (many short replies, a long tail); 10% of rows have no image,
5% two, 15% a second turn. Rows use the documented "messages with placeholders" layout: `<image>` in the user
text and the paths in `images`, relative to the JSONL's folder.

    python scripts/bench/imagetext.py --rows 1000 --seed 0 --root /work/benchdata/imagetext
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

GEN_VERSION = 1  # bump when the generated rows change, so old caches are not reused
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # 70 syllables
ASPECTS = (  # (width / height, probability): landscape, portrait, square, wide screens, panoramas
    (4 / 3, 0.30), (3 / 4, 0.15), (1.0, 0.20), (16 / 9, 0.15), (9 / 16, 0.08), (3.0, 0.04), (1 / 3, 0.03),
    (None, 0.05),  # any ratio in 1/2..2
)  # fmt: skip


def _words(seed: int) -> list[str]:
    rng = np.random.default_rng([seed, 1 << 30])
    return ["".join(rng.choice(SYLLABLES, size=int(rng.integers(1, 4)))) for _ in range(3000)]


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height), each side in 64..2000 px."""
    ratios, probs = zip(*ASPECTS, strict=True)
    ratio = ratios[rng.choice(len(ratios), p=np.array(probs) / sum(probs))]
    if ratio is None:
        ratio = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    long = float(np.clip(rng.lognormal(math.log(640), 0.5), 64, 2000))
    w, h = (long, long / ratio) if ratio >= 1 else (long * ratio, long)
    return int(np.clip(round(w), 64, 2000)), int(np.clip(round(h), 64, 2000))


def _text(rng: np.random.Generator, words: list[str], median: float, sigma: float, hi: int) -> str:
    n = int(np.clip(round(rng.lognormal(math.log(median), sigma)), 1, hi))
    ids = np.minimum(rng.zipf(1.3, size=n) - 1, len(words) - 1)
    return " ".join(words[i] for i in ids)


def make_row(seed: int, i: int, words: list[str]) -> tuple[dict, list[tuple[str, int, int, int]]]:
    """Row i: its JSON and the images to write as (relative path, width, height, image seed)."""
    rng = np.random.default_rng([seed, i])
    n_images = int(rng.choice(3, p=[0.10, 0.85, 0.05]))
    images = []
    for k in range(n_images):
        w, h = image_size(rng)
        images.append((f"images/{i // 1000:04d}/{i}_{k}.jpg", w, h, int(rng.integers(2**31))))
    user = _text(rng, words, median=12, sigma=0.8, hi=300)
    reply = _text(rng, words, median=30, sigma=1.1, hi=1500)
    messages = [
        {"role": "user", "content": "<image>\n" * n_images + user},
        {"role": "assistant", "content": reply},
    ]
    if rng.random() < 0.15:
        messages += [
            {"role": "user", "content": _text(rng, words, median=8, sigma=0.8, hi=200)},
            {"role": "assistant", "content": _text(rng, words, median=20, sigma=1.0, hi=800)},
        ]
    return {"messages": messages, "images": [p for p, *_ in images]}, images


def draw_image(w: int, h: int, seed: int):
    """A smooth random pattern (a coarse colour grid scaled up) with a few shapes: cheap, and JPEG-friendly."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, size=(int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3), dtype=np.uint8)
    image = Image.fromarray(grid).resize((w, h), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(8, max(9, w // 2))), y0 + int(rng.integers(8, max(9, h // 2)))
        fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)((x0, y0, x1, y1), fill=fill)
    return image


def _write_images(args: tuple[str, list[tuple[str, int, int, int]]]) -> int:
    root, images = args
    written = 0
    for rel, w, h, seed in images:
        path = Path(root, rel)
        if path.exists():  # a cut-off earlier generation: files are written atomically, so keep it
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        draw_image(w, h, seed).save(tmp, format="JPEG", quality=80)
        tmp.replace(path)
        written += 1
    return written


def generate(
    rows: int, *, seed: int = 0, root: Path, workers: int | None = None, quiet: bool = False
) -> Path:
    """The JSONL of `rows` rows under `root/seed-<seed>/` (images beside it), generated once and then reused."""
    folder = Path(root) / f"v{GEN_VERSION}-seed-{seed}"
    jsonl, done = folder / f"rows-{rows}.jsonl", folder / f"rows-{rows}.done"
    if done.is_file() and jsonl.is_file():
        return jsonl
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    words = _words(seed)
    lines, chunks, chunk = [], [], []
    for i in range(rows):
        row, images = make_row(seed, i, words)
        lines.append(json.dumps(row))
        chunk += images
        if len(chunk) >= 200:
            chunks.append((str(folder), chunk))
            chunk = []
    chunks.append((str(folder), chunk))
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        written = sum(map(_write_images, chunks))
    else:
        with Pool(workers) as pool:
            written = sum(pool.imap_unordered(_write_images, chunks))
    tmp = jsonl.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(jsonl)
    done.write_text(json.dumps({"rows": rows, "seed": seed, "version": GEN_VERSION}) + "\n")
    if not quiet:
        print(f"generated {jsonl}: {rows} rows, {written} new images in {time.time() - t0:.0f} s", flush=True)
    return jsonl


def describe(jsonl: Path) -> dict:
    """Counts of a generated set: rows by image count, image sizes, text lengths in words, bytes on disk."""
    rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines()]
    from PIL import Image

    sizes = []
    for row in rows[:2000]:  # headers only; a sample is enough for the spread
        for rel in row["images"]:
            with Image.open(jsonl.parent / rel) as im:
                sizes.append(im.size)
    areas = sorted(w * h for w, h in sizes)
    words = sorted(len(m["content"].split()) for r in rows for m in r["messages"] if m["role"] == "assistant")
    n_images = [len(r["images"]) for r in rows]
    image_bytes = sum((jsonl.parent / rel).stat().st_size for r in rows[:2000] for rel in r["images"])
    return {
        "rows": len(rows),
        "rows_by_images": {k: n_images.count(k) for k in sorted(set(n_images))},
        "area_mpx_p10_p50_p90": [round(areas[int(q * (len(areas) - 1))] / 1e6, 3) for q in (0.1, 0.5, 0.9)],
        "portrait_frac": round(sum(h > w for w, h in sizes) / max(len(sizes), 1), 3),
        "reply_words_p50_p90_max": [words[len(words) // 2], words[int(0.9 * (len(words) - 1))], words[-1]],
        "kb_per_image": round(image_bytes / max(len(sizes), 1) / 1024, 1),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1000])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", type=Path, default=Path("/work/benchdata/imagetext"))
    args = p.parse_args(argv)
    for n in args.rows:
        path = generate(n, seed=args.seed, root=args.root)
        print(json.dumps(describe(path)))


if __name__ == "__main__":
    main()
