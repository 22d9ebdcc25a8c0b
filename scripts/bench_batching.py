"""Step time and tokens per second of padded vs padding_free vs packed batching, side by side.

Builds a tiny random-init Llama and a chat data set of varied lengths (short and long replies mixed, as in real
SFT data), then times LoRA training steps (forward, loss, backward, AdamW) in each batching mode, interleaved
and repeated, and prints medians. Every mode sees the same token budget per step.

    python scripts/bench_batching.py [--hidden 64 --layers 2] [--steps 8 --repeats 3] [--tokens 2048]
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

from vlmtune.config.schema import Recipe
from vlmtune.data import Collator, build_dataset
from vlmtune.data.batching import build_collator, build_sampler
from vlmtune.engine.loop import collate, forward, input_tokens, token_loss_sum, trained_tokens
from vlmtune.model.load import load_model, load_tokenizer
from vlmtune.model.lora import apply_lora
from vlmtune.testing import build_tiny_llm

WORDS = ("island", "harbour", "ferry", "winter", "market", "bridge", "lantern", "river", "council", "old")


def write_data(path: Path, n: int, seed: int) -> None:
    """Chats whose reply lengths span 5–250 words, long-tailed (most rows short)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            words = min(250, int(rng.paretovariate(1.2) * 8))
            reply = " ".join(rng.choice(WORDS) for _ in range(words))
            row = {"messages": [{"role": "user", "content": f"Tell me about item {i}."},
                                {"role": "assistant", "content": reply}]}  # fmt: skip
            f.write(json.dumps(row) + "\n")


def modes(tokens: int, max_length: int) -> dict[str, dict]:
    """Recipe overrides per mode, each with about `tokens` tokens per micro-batch."""
    rows = max(1, tokens // 256)  # padded rows per micro-batch at a typical 256-token padded width
    return {
        "padded": {"data": {}, "train": {"micro_batch_size": rows}},
        "padded+group_by_length": {"data": {"group_by_length": True}, "train": {"micro_batch_size": rows}},
        "padded+micro_batch_tokens": {"data": {}, "train": {"micro_batch_tokens": tokens}},
        "padding_free": {"data": {"batching": "padding_free"}, "train": {"micro_batch_tokens": tokens}},
        "packed": {
            "data": {"batching": "packed", "pack_length": max_length},
            "train": {"micro_batch_size": max(1, tokens // max_length)},
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=2048, help="token budget per micro-batch")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-batching-"))
    model_dir = build_tiny_llm(work / "model", hidden_size=args.hidden, num_layers=args.layers)
    write_data(work / "train.jsonl", args.rows, seed=0)

    base = {
        "model": {"path": str(model_dir), "dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": [{"path": str(work / "train.jsonl")}], "max_length": args.max_length, "cache": False},
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
    tokenizer = load_tokenizer(first.model)
    data = build_dataset(first.data.train, first.data, tokenizer, seed=0)
    lengths = data.lengths
    print(f"data: {len(data)} rows, tokens per row mean {statistics.mean(lengths):.0f}, "
          f"median {statistics.median(lengths):.0f}, max {max(lengths)}")  # fmt: skip
    model = apply_lora(
        load_model(first.model, None, device=torch.device("cpu")), first.lora,
        quantized=False, gradient_checkpointing=False,
    )  # fmt: skip
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    padded = Collator(tokenizer.pad_token_id)

    def time_mode(recipe: Recipe, start: int, steps: int) -> tuple[list[float], int, int, int]:
        sampler = build_sampler(recipe, lengths, world_size=1)
        collator = build_collator(recipe, padded, tokenizer.pad_token_id)
        times, real, slots, rows = [], 0, 0, 0
        for step in range(start, start + steps):
            (mb_rows,) = sampler.micro_batches(step, 0)
            t0 = time.perf_counter()
            batch = collate(collator, data, mb_rows)
            loss = token_loss_sum(forward(model, batch), batch["labels"]) / max(
                trained_tokens(batch["labels"]), 1
            )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            real += input_tokens(batch) if "n_tokens" in batch else int(batch["attention_mask"].sum())
            slots += batch["input_ids"].numel()
            rows += sum(len(u) for u in mb_rows) if mb_rows and isinstance(mb_rows[0], list) else len(mb_rows)
        return times, real, slots, rows

    results: dict[str, dict] = {name: {"times": [], "real": 0, "slots": 0, "rows": 0} for name in recipes}
    for recipe in recipes.values():  # warm-up: allocator and kernels, one step each
        time_mode(recipe, 10_000, 1)
    for repeat in range(args.repeats):  # interleaved, so drift on a shared machine hits every mode alike
        for name, recipe in recipes.items():
            times, real, slots, rows = time_mode(recipe, repeat * args.steps, args.steps)
            r = results[name]
            r["times"] += times
            r["real"] += real
            r["slots"] += slots
            r["rows"] += rows

    print(f"model: hidden {args.hidden}, {args.layers} layers; {args.tokens}-token budget per micro-batch; "
          f"median of {args.repeats} × {args.steps} steps, {args.threads} threads")  # fmt: skip
    head = (
        f"{'mode':28} {'step s':>8} {'rows/step':>10} {'real tok/step':>14} {'pad %':>6} {'real tok/s':>11}"
    )
    print(head)
    print("-" * len(head))
    n = args.repeats * args.steps
    for name, r in results.items():
        step = statistics.median(r["times"])
        real_per_step = r["real"] / n
        pad = 100 * (1 - r["real"] / r["slots"])
        print(f"{name:28} {step:8.4f} {r['rows'] / n:10.1f} {real_per_step:14.0f} {pad:6.1f} "
              f"{real_per_step / step:11.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
