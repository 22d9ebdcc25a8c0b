"""Trained tokens per second of padded, length-grouped, padding-free and packed image-text batches, side by side.

Builds the tiny random-init Qwen2-VL of `vlmtune.testing.tiny_vlm` and a generated image-text set with a
realistic skew (most rows one small image and a short reply; some with large images, several images or long
replies; some text-only), then times LoRA training steps in each batching mode, interleaved and repeated, and
prints medians. Every mode has about the same token budget per micro-batch. `step s` is the training step (forward with the vision tower, loss,
backward, AdamW); `collate s`, reading the rows (decoding their images, the processor) and collating, is timed
apart: in training `data.num_workers` does it ahead of the loop, in parallel.

    python scripts/bench/vlm_batching.py [--rows 400 --steps 6 --repeats 3 --tokens 2048] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from vlmtune.config.schema import Recipe
from vlmtune.data import Collator, build_dataset
from vlmtune.data.batching import build_collator, build_sampler
from vlmtune.engine.loop import collate, forward, input_tokens, token_loss_sum, trained_tokens
from vlmtune.families import get_family
from vlmtune.model.load import load_model, load_processor
from vlmtune.model.lora import apply_lora
from vlmtune.testing.tiny_vlm import build_tiny_vlm

WORDS = ("island", "harbour", "ferry", "winter", "market", "bridge", "lantern", "river", "council", "old")
# (width, height) in pixels; with patch 14 and merge 2 an image gets (w / 28) x (h / 28) tokens: 4 to 192.
SIZES = [(56, 56)] * 6 + [(112, 84)] * 3 + [(224, 168), (448, 336)]


def write_data(root: Path, n: int, seed: int) -> None:
    """Rows with 0–3 images of skewed sizes and long-tailed reply lengths."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True)
    for k, (w, h) in enumerate(sorted(set(SIZES))):
        Image.new("RGB", (w, h), (40 * k % 255, 90, 160)).save(root / "images" / f"{w}x{h}.png")
    with (root / "train.jsonl").open("w") as f:
        for i in range(n):
            images = rng.choices([0, 1, 2, 3], weights=[2, 12, 3, 1])[0]
            words = min(200, int(rng.paretovariate(1.3) * 6))
            reply = " ".join(rng.choice(WORDS) for _ in range(words))
            row = {
                "messages": [
                    {"role": "user", "content": "<image>" * images + f"Describe picture {i}."},
                    {"role": "assistant", "content": reply},
                ],
                "images": [f"images/{w}x{h}.png" for w, h in rng.choices(SIZES, k=images)],
            }
            f.write(json.dumps(row) + "\n")


def modes(tokens: int, max_length: int) -> dict[str, dict]:
    """Recipe overrides per mode, each with about `tokens` tokens per micro-batch."""
    rows = max(1, tokens // 256)  # padded rows per micro-batch at a typical 256-token padded width
    return {
        "padded": {"data": {}, "train": {"micro_batch_size": rows}},
        "padded+group_by_length": {"data": {"group_by_length": True}, "train": {"micro_batch_size": rows}},
        "padding_free": {"data": {"batching": "padding_free"}, "train": {"micro_batch_tokens": tokens}},
        "packed": {
            "data": {"batching": "packed", "pack_length": max_length},
            "train": {"micro_batch_size": max(1, tokens // max_length)},
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=2048, help="token budget per micro-batch")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--ranks", type=int, default=2, help="processes for the rank-balance table")
    p.add_argument(
        "--balance-only", action="store_true", help="only the rank-balance table (no model, no timing)"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-vlm-batching-"))
    family = get_family("qwen2_vl")
    model_dir = build_tiny_vlm(family.name, work / "model")
    write_data(work / "data", args.rows, seed=0)

    base = {
        "model": {"path": str(model_dir), "dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "vision": {"max_pixels": 448 * 448},
        "data": {
            "train": [{"path": str(work / "data/train.jsonl"), "image_root": str(work / "data")}],
            "max_length": args.max_length,
            "cache": False,
        },
        "train": {"output_dir": str(work / "out"), "grad_accum": 1, "mixed_precision": "no",
                  "gradient_checkpointing": False},
    }  # fmt: skip
    recipes = {}
    for name, over in modes(args.tokens, args.max_length).items():
        raw = json.loads(json.dumps(base))
        raw["data"].update(over["data"])
        raw["train"].update(over["train"])
        recipes[name] = Recipe.model_validate(raw)

    first = next(iter(recipes.values()))
    processor = load_processor(first.model, family, first.vision)
    data = build_dataset(first.data.train, first.data, processor, family=family, seed=0)
    lengths = data.lengths
    image_tokens = data.image_tokens()
    print(
        f"data: {len(data)} rows, tokens per row mean {statistics.mean(lengths):.0f}, median "
        f"{statistics.median(lengths):.0f}, max {max(lengths)}; image tokens per row mean "
        f"{float(image_tokens.mean()):.0f}, max {int(image_tokens.max())}; {int((data.images() == 0).sum())} text-only"
    )
    balance = rank_balance(recipes, lengths, image_tokens, args.ranks)
    if args.balance_only:
        return
    model = load_model(first.model, None, device=torch.device("cpu"), family=family)
    model = apply_lora(
        model, first.lora, quantized=False, gradient_checkpointing=False, family=family, vision=first.vision
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    pad = processor.tokenizer.pad_token_id
    padded = Collator(pad, family)

    def time_mode(
        recipe: Recipe, start: int, steps: int
    ) -> tuple[list[float], list[float], int, int, int, int]:
        sampler = build_sampler(recipe, lengths, world_size=1)
        collator = build_collator(recipe, padded, pad, family=family, model_config=model.config)
        times, data_times, real, slots, rows, trained = [], [], 0, 0, 0, 0
        for step in range(start, start + steps):
            (mb_rows,) = sampler.micro_batches(step, 0)
            t_data = time.perf_counter()
            batch = collate(
                collator, data, mb_rows
            )  # decodes the images: done by data.num_workers in training
            t0 = time.perf_counter()
            data_times.append(t0 - t_data)
            n = max(trained_tokens(batch["labels"]), 1)
            loss = token_loss_sum(forward(model, batch), batch["labels"]) / n
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            real += input_tokens(batch)
            slots += batch["input_ids"].numel()
            trained += n
            rows += sum(len(u) for u in mb_rows) if mb_rows and isinstance(mb_rows[0], list) else len(mb_rows)
        return times, data_times, real, slots, rows, trained

    results = {
        name: {"times": [], "data": [], "real": 0, "slots": 0, "rows": 0, "trained": 0} for name in recipes
    }
    for recipe in recipes.values():  # warm-up: allocator and kernels, one step each
        time_mode(recipe, 10_000, 1)
    for repeat in range(args.repeats):  # interleaved, so drift on a shared machine hits every mode alike
        for name, recipe in recipes.items():
            times, data_times, real, slots, rows, trained = time_mode(recipe, repeat * args.steps, args.steps)
            r = results[name]
            r["times"] += times
            r["data"] += data_times
            r["real"] += real
            r["slots"] += slots
            r["rows"] += rows
            r["trained"] += trained

    print(f"tiny Qwen2-VL (LoRA r 8, fp32, sdpa); {args.tokens}-token budget per micro-batch; median of "
          f"{args.repeats} × {args.steps} steps, {args.threads} threads")  # fmt: skip
    head = (
        f"{'mode':24} {'step s':>8} {'collate s':>10} {'rows/step':>10} {'real tok/step':>14} {'pad %':>6} "
        f"{'real tok/s':>11} {'trained tok/s':>14} {'vs padded':>10}"
    )
    print(head)
    print("-" * len(head))
    n = args.repeats * args.steps
    summary = {}
    for name, r in results.items():
        step = statistics.median(r["times"])
        summary[name] = {
            "step_s": step,
            "collate_s": statistics.median(r["data"]),
            "rows_per_step": r["rows"] / n,
            "real_tokens_per_step": r["real"] / n,
            "pad_pct": 100 * (1 - r["real"] / r["slots"]),
            "real_tokens_per_s": r["real"] / n / step,
            "trained_tokens_per_s": r["trained"] / n / step,
        }
    ref = summary["padded"]["trained_tokens_per_s"]
    for name, s in summary.items():
        print(f"{name:24} {s['step_s']:8.4f} {s['collate_s']:10.4f} {s['rows_per_step']:10.1f} {s['real_tokens_per_step']:14.0f} "
              f"{s['pad_pct']:6.1f} {s['real_tokens_per_s']:11.0f} {s['trained_tokens_per_s']:14.0f} "
              f"{s['trained_tokens_per_s'] / ref:9.2f}x")  # fmt: skip
    if args.json:
        out = {"args": vars(args) | {"json": str(args.json)}, "modes": summary, "rank_balance": balance}
        args.json.write_text(json.dumps(out, indent=2))


def rank_balance(recipes: dict[str, Recipe], lengths, image_tokens, ranks: int) -> dict[str, dict]:
    """Mean and worst per-step imbalance (largest process's work over the mean) over one epoch, with rows dealt
    in order and with `data.balance_ranks`: the sampler alone, as `rank_imbalance` in metrics.jsonl."""
    costs = [n + int(k) for n, k in zip(lengths, image_tokens, strict=True)]
    print(f"rank balance over one epoch, {ranks} processes (work = tokens + image tokens):")
    print(f"{'mode':24} {'in order: mean':>15} {'worst':>7} {'balanced: mean':>15} {'worst':>7}")
    out = {}
    for name, recipe in recipes.items():
        row = {}
        for key, on in (("in_order", False), ("balanced", True)):
            r = recipe.model_copy(update={"data": recipe.data.model_copy(update={"balance_ranks": on})})
            sampler = build_sampler(r, lengths, world_size=ranks, image_tokens=image_tokens)
            ratios = []
            for step in range(sampler.steps_per_epoch):
                loads = []
                for rank in range(ranks):
                    rows = [
                        i
                        for mb in sampler.micro_batches(step, rank)
                        for u in mb
                        for i in (u if isinstance(u, list) else [u])
                    ]
                    loads.append(sum(costs[i] for i in rows))
                ratios.append(max(loads) * ranks / max(sum(loads), 1))
            row[key] = {"mean": statistics.mean(ratios), "worst": max(ratios)}
        out[name] = row
        print(f"{name:24} {row['in_order']['mean']:15.3f} {row['in_order']['worst']:7.3f} "
              f"{row['balanced']['mean']:15.3f} {row['balanced']['worst']:7.3f}")  # fmt: skip
    return out


if __name__ == "__main__":
    main()
