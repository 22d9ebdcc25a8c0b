"""Peak memory and step time of one LoRA training step with train.loss standard vs chunked.

    python scripts/bench_loss.py                       # every mode, each in a fresh process, as a table
    python scripts/bench_loss.py --vocab 151936 --seq 1024
    python scripts/bench_loss.py --mode chunked        # one mode in this process

A random-init Llama (hidden 256, 2 layers) with a large vocabulary, so the logits dominate as they do in real
models. Peak memory: torch's max allocated on CUDA; on the CPU the process's peak RSS minus its RSS before the
step (each mode runs in its own process, so one mode's peak cannot hide another's).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from functools import partial

MODES = ("standard", "chunked", "chunked+offload")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlmtune.config.schema import LoraConfig
    from vlmtune.engine.loop import forward, token_loss_sum
    from vlmtune.engine.loss import LeanLoss
    from vlmtune.engine.offload import OffloadActivations
    from vlmtune.model.lora import apply_lora

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model = apply_lora(
        model, LoraConfig(r=16, dropout=0.0), quantized=False, gradient_checkpointing=True
    ).train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    labels = ids.clone()
    labels[:, : args.seq // 4] = -100  # a prompt: a quarter of the tokens is not trained
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    lean = LeanLoss(model, "chunked", args.chunk) if args.mode != "standard" else None
    offload = args.mode.endswith("offload") and device.type == "cuda"

    def step() -> float:
        with (
            OffloadActivations()
            if offload
            else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
        ):
            if lean is None:
                loss = token_loss_sum(forward(model, batch), labels)
            else:
                loss = lean(partial(forward, model, batch), batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss)

    step()  # warm-up (and the lean loss's one-time head check)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mb()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "mode": args.mode,
        "device": str(device),
        "loss": loss,
        "step_s": sorted(times)[len(times) // 2],
        "peak_over_base_mb": round(peak - base, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args)))
        return
    rows = []
    for mode in MODES:
        argv = [a for a in sys.argv[1:]] + ["--mode", mode]
        out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"vocab {args.vocab}, {args.batch}×{args.seq} tokens, hidden {args.hidden}, {args.dtype}, chunk {args.chunk}"
    )
    print(f"{'mode':<18}{'device':<8}{'loss':>12}{'step s':>9}{'peak MB over base':>19}")
    for r in rows:
        print(
            f"{r['mode']:<18}{r['device']:<8}{r['loss']:>12.3f}{r['step_s']:>9.3f}{r['peak_over_base_mb']:>19.1f}"
        )


if __name__ == "__main__":
    main()
