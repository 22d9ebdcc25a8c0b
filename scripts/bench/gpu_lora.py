"""GPU LoRA throughput on a Llama-3-8B-shaped random-init model, through vlmtune's own step.

The model is built in bf16 directly on the GPU (no download, no 16 GB checkpoint to write), wrapped by vlmtune's
`apply_lora` (all-linear LoRA r 16, gradient checkpointing as the recipes default), optimised by its
`build_optimizer` (AdamW) and trained with its `forward` + `token_loss_sum` (token-normalised loss, clipping
at 1.0): the per-step work of `vlmtune.engine.loop`, without the data pipeline and the accelerate wrapper.

1. Throughput: batch 2 × T 4096 random tokens (all trained); tokens/s after warm-up steps, peak memory.
2. Context search: the longest T that trains one step at batch 1 (doubling, then bisection to --granularity).

    python scripts/bench/gpu_lora.py                 # one CUDA GPU; target ≥ 14k tokens/s on one H100
    python scripts/bench/gpu_lora.py --tiny          # the same logic on a tiny model, on CPU (a harness check)
    python scripts/bench/gpu_lora.py --tiny --fake-oom-above 700   # exercises the bisection without a GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

LLAMA3_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
TINY = {**LLAMA3_8B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 224, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
TARGET_TOKENS_PER_S = 14_000


class SimulatedOOM(RuntimeError):
    """--fake-oom-above: a context over the limit fails like an out-of-memory error, to test the search."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--tiny", action="store_true", help="tiny Llama, CPU allowed: checks the logic, not the speed"
    )
    p.add_argument("--seq", type=int, default=None, help="throughput context length (default 4096; tiny 128)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; tiny 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny 1)")
    p.add_argument("--no-gradient-checkpointing", dest="gc", action="store_false")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument(
        "--search-from", type=int, default=None, help="first context tried at batch 1 (default --seq)"
    )
    p.add_argument(
        "--search-max", type=int, default=None, help="stop doubling here (default 131072; tiny 2048)"
    )
    p.add_argument("--granularity", type=int, default=None, help="bisection step (default 1024; tiny 64)")
    p.add_argument("--no-search", dest="search", action="store_false")
    p.add_argument("--fake-oom-above", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.seq = args.seq or (128 if tiny else 4096)
    args.steps = args.steps or (3 if tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    args.search_from = args.search_from or args.seq
    args.search_max = args.search_max or (2048 if tiny else 131072)
    args.granularity = args.granularity or (64 if tiny else 1024)
    return args


def build(args, device):
    """The bf16 random-init Llama with vlmtune's LoRA and optimizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlmtune.config.schema import LoraConfig, TrainConfig
    from vlmtune.engine.optim import build_optimizer
    from vlmtune.model.lora import apply_lora

    config = LlamaConfig(**(TINY if args.tiny else LLAMA3_8B))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    lora = LoraConfig(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0, target_modules="all-linear")
    model = apply_lora(model, lora, quantized=False, gradient_checkpointing=args.gc)
    model.train()
    optimizer = build_optimizer(model, TrainConfig(output_dir="unused", lr=1e-4, weight_decay=0.0))
    return config, model, optimizer


def train_step(model, optimizer, batch, fake_oom_above: int | None = None) -> float:
    """One optimizer step as vlmtune's loop takes it: forward, summed token loss / trained tokens, clip, step."""
    import torch

    from vlmtune.engine.loop import forward, token_loss_sum, trained_tokens

    if fake_oom_above is not None and batch["input_ids"].numel() > fake_oom_above:
        raise SimulatedOOM(f"simulated: {batch['input_ids'].numel()} tokens > {fake_oom_above}")
    logits = forward(model, batch, torch.bfloat16)
    loss = token_loss_sum(logits, batch["labels"]) / max(trained_tokens(batch["labels"]), 1)
    del logits
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def random_batch(vocab: int, batch: int, seq: int, device):
    import torch

    ids = torch.randint(0, vocab, (batch, seq), device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def throughput(args, config, model, optimizer, device) -> dict:
    import torch

    batch = random_batch(config.vocab_size, args.batch, args.seq, device)
    losses = [train_step(model, optimizer, batch) for _ in range(args.warmup)]
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    losses += [train_step(model, optimizer, batch) for _ in range(args.steps)]
    sync(device)
    elapsed = time.perf_counter() - start
    return {
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "tokens_per_s": args.batch * args.seq * args.steps / elapsed,
        "step_s": elapsed / args.steps,
        "peak_mem_gib": peak_gib(device),
        "losses": losses,
    }


def longest_context(args, config, model, optimizer, device) -> dict:
    """Double T from --search-from until a step fails (OOM) or --search-max, then bisect to --granularity."""
    import torch

    def fits(seq: int) -> bool:
        try:
            train_step(model, optimizer, random_batch(config.vocab_size, 1, seq, device), args.fake_oom_above)
            ok = True
        except (torch.OutOfMemoryError, SimulatedOOM):
            ok = False
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"  context {seq:>7}: {'trains' if ok else 'out of memory'}", flush=True)
        return ok

    good, bad, seq = 0, None, args.search_from
    while seq <= args.search_max:
        if not fits(seq):
            bad = seq
            break
        good, seq = seq, seq * 2
    if bad is None:
        return {"longest_context": good, "limited_by": f"--search-max {args.search_max}"}
    while bad - good > args.granularity:
        mid = (good + bad) // 2 // args.granularity * args.granularity
        if mid <= good:
            break
        if fits(mid):
            good = mid
        else:
            bad = mid
    return {"longest_context": good, "limited_by": f"out of memory at {bad}"}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.tiny:
        print(
            "error: gpu_lora.py needs a CUDA GPU (torch.cuda.is_available() is False here). Run it on a GPU "
            "machine, or pass --tiny to check its logic on CPU with a tiny model.",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    config, model, optimizer = build(args, device)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{'tiny' if args.tiny else 'Llama-3-8B-shaped'} model on {name}: {total / 1e6:,.1f} M parameters, "
          f"{trainable / 1e6:.1f} M trainable (LoRA r {args.lora_r}), bf16, gradient checkpointing {args.gc}")  # fmt: skip

    out = {"device": name, "tiny": args.tiny, "gradient_checkpointing": args.gc}
    out["throughput"] = t = throughput(args, config, model, optimizer, device)
    mem = f"{t['peak_mem_gib']:.1f} GiB" if t["peak_mem_gib"] is not None else "n/a on CPU"
    print(f"batch {t['batch']} × T {t['seq']}: {t['tokens_per_s']:,.0f} tokens/s ({t['step_s']:.3f} s/step over "
          f"{t['steps']} steps), peak memory {mem}, losses {[round(x, 3) for x in t['losses']]}")  # fmt: skip
    if not args.tiny:
        met = t["tokens_per_s"] >= TARGET_TOKENS_PER_S
        print(f"target ≥ {TARGET_TOKENS_PER_S:,} tokens/s on one H100: {'met' if met else 'NOT met'}")
    if args.search:
        print("longest context at batch 1:")
        out["search"] = s = longest_context(args, config, model, optimizer, device)
        print(f"longest context that trains at batch 1: {s['longest_context']} ({s['limited_by']})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
