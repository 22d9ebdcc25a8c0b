"""Side-by-side CPU benchmark: vlmtune vs TRL SFTTrainer vs transformers Trainer + PEFT.

Same random-init Llama-style model (one safetensors file, checksummed before every run), same pre-tokenised
Alpaca-like data (vlmtune's own tokenisation, handed to the others as `input_ids` + `labels` in vlmtune's
order), same LoRA and AdamW, fp32. Every run is a fresh process; runs are interleaved (the contender order
rotates each round) and repeated; the summary gives medians and ratios of tokens/s, peak RSS and time to first
step per batching mode, the step-1 losses (equal model and data must give equal losses) and a checksum of the
token ids and trained labels each contender's collator produced.

    python scripts/bench/cpu_compare.py --rounds 3 --modes padded padding_free packed
    python scripts/bench/cpu_compare.py --quick     # 1 round, few rows: checks the harness, not the speed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import build_model, make_rows, weights_sha256, write_jsonl  # noqa: E402

REPO = HERE.parents[1]
MODES = ("padded", "padding_free", "packed")
# in-memory: vlmtune with every batch collated before training (no data work while it trains), against which
# the real data path's step time is measured.
CONTENDERS = ("vlmtune", "in-memory", "trl", "hf")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=REPO / "runs/bench-cpu", help="scratch folder (rebuilt)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument(
        "--rows", type=int, default=32, help="training rows (one epoch); a multiple of --micro-batch"
    )
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--pack-length", type=int, default=1024, help="packed mode: tokens per packed row")
    p.add_argument("--micro-batch-tokens", type=int, default=None, help="vlmtune train.micro_batch_tokens")
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (the machine is shared)")
    p.add_argument("--quick", action="store_true", help="1 round, 16 rows of 4: a harness check")
    p.add_argument(
        "--summary-of", type=Path, default=None, help="re-print the summary of a (partial) run's --work"
    )
    p.add_argument("--child", nargs=2, metavar=("CONTENDER", "SPEC"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.work = args.work.resolve()  # each child runs in its own folder
    if args.quick:
        args.rounds, args.rows, args.micro_batch = 1, 8, 2
    if args.rows % args.micro_batch:
        p.error("--rows must be a multiple of --micro-batch (one whole epoch, no wrapped rows)")
    return args


# --- child ---------------------------------------------------------------------------------------------------


def child(contender: str, spec_path: str) -> None:
    import torch
    from contenders import CONTENDERS as RUNNERS
    from contenders import Clock

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    clock = Clock()
    recorder = RUNNERS[contender](spec, clock)
    n = len(clock.stamps)
    tokens = recorder.tokens[:n]
    # Step 1 pays one-off costs (lazy init, allocator warm-up): throughput is measured from its end.
    elapsed = clock.stamps[-1] - clock.stamps[0] if n > 1 else float("nan")
    result = {
        "steps": n,
        "tokens_per_s": sum(tokens[1:]) / elapsed if n > 1 else float("nan"),
        "first_step_wall": clock.first_step_wall,
        "losses": clock.losses[:3],
        "step_s": [round(b - a, 3) for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)],
        **recorder.summary(),
    }
    Path(spec["result"]).write_text(json.dumps(result))


# --- parent --------------------------------------------------------------------------------------------------


def prepare(args) -> dict:
    """Model, data, the vlmtune recipe per mode, and the pre-tokenised rows in vlmtune's training order."""
    import yaml

    from vlmtune.config.load import load_recipe
    from vlmtune.data import build_dataset
    from vlmtune.data.sampler import StepSampler
    from vlmtune.errors import UserError
    from vlmtune.model.load import load_tokenizer

    work = args.work
    model_dir, data_dir = work / "model", work / "data"
    sha = build_model(model_dir, vocab_size=args.vocab, hidden=args.hidden, layers=args.layers)
    data_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(data_dir / "train.jsonl", make_rows(args.rows, vocab_size=args.vocab, seed=1))

    recipes, skipped = {}, {}
    for mode in args.modes:
        recipe = vlmtune_recipe(args, model_dir, data_dir / "train.jsonl", mode)
        path = work / f"vlmtune-{mode}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        try:
            load_recipe(path)
            recipes[mode] = str(path)
        except UserError as exc:
            skipped[mode] = f"not supported by this vlmtune (its recipe schema rejects the keys): {exc}"

    # vlmtune's own tokenisation and order, so the other contenders train on exactly its token ids.
    tokenise = work / "vlmtune-tokenise.yaml"
    tokenise.write_text(yaml.safe_dump(vlmtune_recipe(args, model_dir, data_dir / "train.jsonl", "padded")))
    recipe = load_recipe(tokenise)
    data = build_dataset(
        recipe.data.train, recipe.data, load_tokenizer(recipe.model, recipe._base_dir), seed=recipe.train.seed
    )
    sampler = StepSampler(
        len(data), micro_batch=args.micro_batch, grad_accum=1, world_size=1, seed=recipe.train.seed
    )
    order = [i for step in range(sampler.steps_per_epoch) for i in sampler.micro_batches(step, 0)[0]]
    write_jsonl(data_dir / "tokens.jsonl", [data[i] for i in order])
    lengths = sorted(len(data[i]["input_ids"]) for i in range(len(data)))
    print(
        f"model: vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, sha256 {sha[:16]}; data: "
        f"{len(data)} rows, {sum(lengths)} tokens, length median {lengths[len(lengths) // 2]} "
        f"(min {lengths[0]}, max {lengths[-1]})"
    )
    return {"model_dir": str(model_dir), "sha": sha, "tokens": str(data_dir / "tokens.jsonl"),
            "recipes": recipes, "skipped": skipped}  # fmt: skip


def vlmtune_recipe(args, model_dir: Path, data: Path, mode: str) -> dict:
    recipe = {
        "model": {"path": str(model_dir), "dtype": "float32", "attn_implementation": "sdpa"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": LORA_TARGETS},
        "data": {"train": [{"path": str(data), "format": "messages"}], "max_length": 512},
        "train": {
            "output_dir": str(args.work / "runs/unused"),
            "epochs": 1,
            "micro_batch_size": args.micro_batch,
            "grad_accum": 1,
            "lr": args.lr,
            "scheduler": "constant",
            "warmup_ratio": 0.0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "optimizer": "adamw",
            "mixed_precision": "no",
            "gradient_checkpointing": False,
            "log_every": 1,
            "report_to": [],
        },
        "checkpoint": {"every": 0, "keep_last": 1, "resume": "never"},
        "launch": {"accelerate_config": str(REPO / "accelerate_configs/cpu.yaml")},
    }
    # The batching keys (CONTRACT with the batching work): padded is the default, so it is not written.
    if mode != "padded":
        recipe["data"]["batching"] = mode
    if mode == "packed":  # one pack of pack_length tokens per step, as TRL's packed run gets
        recipe["data"]["pack_length"] = args.pack_length
        recipe["train"]["micro_batch_size"] = 1
    if mode != "padded" and args.micro_batch_tokens:
        recipe["train"]["micro_batch_tokens"] = args.micro_batch_tokens
    return recipe


def run_one(args, prep: dict, contender: str, mode: str, tag: str) -> dict:
    """One fresh child process; returns its measurements plus peak RSS (wait4) and time to first step."""
    if weights_sha256(Path(prep["model_dir"])) != prep["sha"]:
        raise SystemExit("the model weights changed between runs; the comparison would be unfair")
    run_dir = args.work / "runs" / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "mode": mode, "model_dir": prep["model_dir"], "tokens": prep["tokens"], "recipe": prep["recipes"].get(mode),
        "output_dir": str(run_dir / "out"), "result": str(run_dir / "result.json"), "micro_batch": args.micro_batch,
        "lr": args.lr, "lora_r": 16, "lora_alpha": 32, "lora_targets": LORA_TARGETS,
        "pack_length": args.pack_length, "threads": args.threads,
    }  # fmt: skip
    (run_dir / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": f"{REPO}:{HERE}",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
    start = time.time()
    with open(run_dir / "log.txt", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", contender, str(run_dir / "spec.json")],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=run_dir,
        )  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = (run_dir / "log.txt").read_text().splitlines()[-15:]
        return {"error": f"exit {code}; last lines of {run_dir / 'log.txt'}:\n    " + "\n    ".join(tail)}
    result = json.loads((run_dir / "result.json").read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    result["ttfs_s"] = result.pop("first_step_wall") - start
    return result


def median(values):
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def summarise(results: dict, prep: dict, args) -> bool:
    """Print medians, ratios, the fairness evidence and the targets; True if every check of fairness passed."""
    fair = True
    print(f"\n=== medians over {args.rounds} round(s); {args.threads} thread(s) per run ===")
    print(f"{'mode':13} {'contender':9} {'tok/s':>8} {'peak RSS MB':>12} {'1st step s':>10} {'steps':>6} "
          f"{'step-1 loss':>12} {'tokens sha256':>17}")  # fmt: skip
    med = {}
    for (mode, who), runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            print(f"{mode:13} {who:9} failed: {runs[0]['error']}")
            continue
        m = {k: median([r[k] for r in ok]) for k in ("tokens_per_s", "peak_rss_mb", "ttfs_s")}
        med[mode, who] = m
        shas = {r["tokens_sha256"] for r in ok}
        loss1 = ok[0]["losses"][0] if ok[0]["losses"] else float("nan")
        print(f"{mode:13} {who:9} {m['tokens_per_s']:8.0f} {m['peak_rss_mb']:12.0f} {m['ttfs_s']:10.1f} "
              f"{ok[0]['steps']:6d} {loss1:12.6f} {','.join(shas):>17}  (n={len(ok)})")  # fmt: skip
    for mode, why in prep["skipped"].items():
        print(f"{mode:13} {'vlmtune':9} skipped: {'; '.join(line.strip() for line in why.splitlines())}")

    print("\n=== fairness: same data, same order, same model → same step-1 loss ===")
    for mode in args.modes:
        runs = {who: [r for r in results.get((mode, who), []) if "error" not in r] for who in args.contenders}
        runs = {w: r for w, r in runs.items() if r}
        if len(runs) < 2:
            continue
        shas = {w: r[0]["tokens_sha256"] for w, r in runs.items()}
        losses = {w: r[0]["losses"][0] for w, r in runs.items() if r[0]["losses"]}
        same_tokens = len(set(shas.values())) == 1
        spread = max(losses.values()) - min(losses.values()) if losses else float("nan")
        if mode == "packed":
            print(
                f"{mode}: packs differ by design (each packs its own way); token sha {shas}; step-1 loss {losses}"
            )
            continue
        agree = same_tokens and spread < 1e-3
        fair &= agree
        print(f"{mode}: token ids + labels identical: {same_tokens}; step-1 losses {losses} "
              f"(spread {spread:.2e}) → {'OK' if agree else 'MISMATCH'}")  # fmt: skip

    print("\n=== the data path: vlmtune on its real data pipeline vs the same batches from memory ===")
    for mode in args.modes:
        v, mem = med.get((mode, "vlmtune")), med.get((mode, "in-memory"))
        if v and mem:
            print(f"{mode}: real data {v['tokens_per_s']:.0f} tok/s, in-memory batches {mem['tokens_per_s']:.0f} tok/s "
                  f"(real / in-memory ×{v['tokens_per_s'] / mem['tokens_per_s']:.3f})")  # fmt: skip

    print("\n=== ratios (vlmtune / other, medians) and targets ===")
    trl_padded = med.get(("padded", "trl"))
    for mode in args.modes:
        v = med.get((mode, "vlmtune"))
        if v is None:
            continue
        for other in ("trl", "hf"):
            o = med.get((mode, other))
            if o:
                print(f"{mode}: tok/s ×{v['tokens_per_s'] / o['tokens_per_s']:.2f} vs {other} {mode}; peak RSS "
                      f"×{v['peak_rss_mb'] / o['peak_rss_mb']:.2f}; 1st step ×{v['ttfs_s'] / o['ttfs_s']:.2f}")  # fmt: skip
        if trl_padded:
            speed = v["tokens_per_s"] / trl_padded["tokens_per_s"]
            target = 1.0 if mode == "padded" else 1.8
            print(
                f"{mode}: target tok/s ≥ {target}× TRL padded: ×{speed:.2f} → {'met' if speed >= target else 'NOT met'}"
            )
        o = med.get((mode, "trl"))
        if o:
            ok = v["peak_rss_mb"] <= o["peak_rss_mb"]
            print(f"{mode}: target peak RSS ≤ TRL {mode}: {v['peak_rss_mb']:.0f} vs {o['peak_rss_mb']:.0f} MB → "
                  f"{'met' if ok else 'NOT met'}")  # fmt: skip
    return fair


def save(work: Path, prep: dict, results: dict, rounds_done: int) -> None:
    """Every finished run is kept, so an interrupted benchmark can still be summarised (--summary-of)."""
    flat = {f"{mode}/{who}": runs for (mode, who), runs in results.items()}
    tmp = work / "results.json.tmp"
    tmp.write_text(json.dumps({"prep": prep, "rounds_done": rounds_done, "results": flat}))
    tmp.replace(work / "results.json")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    if args.summary_of:
        saved = json.loads((args.summary_of / "results.json").read_text())
        args.rounds = saved["rounds_done"]
        results = {tuple(k.split("/")): v for k, v in saved["results"].items()}
        return 0 if summarise(results, saved["prep"], args) else 1
    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    t0 = time.time()
    prep = prepare(args)
    results: dict = {}
    for rnd in range(args.rounds):
        for mode in args.modes:
            # Rotate the order every round, so no contender always runs first (or after the same neighbour).
            order = (
                args.contenders[rnd % len(args.contenders) :] + args.contenders[: rnd % len(args.contenders)]
            )
            for who in order:
                if who in ("vlmtune", "in-memory") and mode not in prep["recipes"]:
                    continue
                if who == "hf" and mode == "packed":
                    continue  # Trainer has no packing (DataCollatorWithFlattening is the padding-free mode)
                r = run_one(args, prep, who, mode, f"r{rnd}-{mode}-{who}")
                results.setdefault((mode, who), []).append(r)
                brief = r.get("error") or f"{r['tokens_per_s']:.0f} tok/s, {r['peak_rss_mb']:.0f} MB, " \
                    f"1st step {r['ttfs_s']:.1f} s, loss1 {r['losses'][:1]}, sha {r['tokens_sha256']}"  # fmt: skip
                print(f"round {rnd + 1} {mode:13} {who:8} {brief}", flush=True)
                save(args.work, prep, results, rnd + 1)
    fair = summarise(results, prep, args)
    print(f"\ntotal wall time {time.time() - t0:.0f} s; raw results under {args.work}/runs/*/result.json")
    return 0 if fair else 1


if __name__ == "__main__":
    sys.exit(main())
