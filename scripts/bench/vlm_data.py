"""Image-text data at scale: start-up time, data preparation, memory and data wait of a VLM run, by dataset size.

A generated image-text set (`imagetext.py`: JPEGs of varied sizes, chat-like text) trains a few LoRA steps of
the tiny Qwen2-VL (`vlmtune.testing.tiny_vlm`) with a real-size image setting (`vision.max_pixels: 1003520`),
through the real entry point (`vlmtune launch`, one fresh process tree per run), and is measured from outside:

- time to first step: launch to the first record of metrics.jsonl (`train.log_every: 1`);
- data preparation: from the log line that names the model family (next come the processor, then the data;
  nothing else) to the one that reports the train data (`--prep-start` / `--prep-end` regexes; the output is
  stamped as it arrives), and rows / s over it;
- peak memory: the training process's RSS per rank, and PSS of the whole tree (launcher, ranks, workers);
- step time and `data_wait_frac` from metrics.jsonl (steps 2..N: step 1 pays the worker start-up), against the
  in-memory contender (every step's batches collated before step 1, `vlm_in_memory.py`).

Measurements (`--what`): startup (1 process, num_workers 0: cold = empty VLMTUNE_CACHE_DIR and HF_DATASETS_CACHE,
then warm = the same caches), workers (1 process, warm, each of `--workers`; the warm start-up run is the
num_workers 0 one), ddp (2 CPU processes, gloo DDP, cold then warm). Runs past `--timeout` or `--mem-cap-gb`
(tree PSS) are killed and recorded with how far data preparation got; the rest of that size and process count
is then skipped (`--no-skip` runs it anyway). Only public recipe keys, the CLI and metrics.jsonl are used, so
the same script measures any version of vlmtune.

    python scripts/bench/vlm_data.py --rows 200 1000                    # everything, 1 round
    python scripts/bench/vlm_data.py --rows 200 --what startup --rounds 3
    python scripts/bench/vlm_data.py --rows 1000 10000 100000 --what startup ddp --timeout 600
    python scripts/bench/vlm_data.py --summary-of /work/benchdata/results/LAST   # re-print a run's tables
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from imagetext import describe, generate  # noqa: E402
from watch import free_port, load_average, watch  # noqa: E402

REPO = HERE.parents[1]
WHAT = ("startup", "workers", "ddp")
CONTENDERS = ("vlmtune", "in-memory")
MAX_PIXELS = 1003520  # 1280 × 28 × 28: Qwen2-VL's shipped max_pixels


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[200, 1000], help="dataset sizes")
    p.add_argument("--what", nargs="+", choices=WHAT, default=list(WHAT))
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="data.num_workers for `workers`")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument(
        "--max-length", type=int, default=8192, help="data.max_length (a 1 Mpx image is 1,280 tokens)"
    )
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS)
    p.add_argument("--timeout", type=float, default=600, help="seconds per run before it is killed")
    p.add_argument("--mem-cap-gb", type=float, default=10.0, help="tree PSS (GB) at which a run is killed")
    p.add_argument(
        "--min-free-gb", type=float, default=2.0, help="kill a run when the machine has less memory available"
    )
    p.add_argument(
        "--threads", type=int, default=1, help="OMP_NUM_THREADS per process (the machine is shared)"
    )
    p.add_argument("--no-skip", action="store_true", help="do not skip the rest of a size after a capped run")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated data")
    p.add_argument("--data-root", type=Path, default=Path("/work/benchdata/imagetext"))
    p.add_argument("--model-dir", type=Path, default=Path("/work/benchdata/models/qwen2_vl"))
    p.add_argument(
        "--work", type=Path, default=None, help="results folder (default /work/benchdata/results/TIME)"
    )
    p.add_argument(
        "--prep-start", default=r"vision-language model family", help="log regex: data prep starts"
    )
    p.add_argument("--prep-end", default=r"train data:", help="log regex: data prep is done")
    p.add_argument("--summary-of", type=Path, default=None, help="re-print the tables of a results folder")
    args = p.parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    args.work = (args.work or Path("/work/benchdata/results") / stamp).resolve()
    return args


def recipe(args, data: Path, out: Path, workers: int) -> dict:
    """Public recipe keys only: what a user would write."""
    return {
        "model": {"path": str(args.model_dir), "dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "vision": {"max_pixels": args.max_pixels},
        "data": {
            "train": [{"path": str(data), "format": "messages"}],
            "max_length": args.max_length,
            "num_workers": workers,
        },
        "train": {
            "output_dir": str(out), "micro_batch_size": args.micro_batch, "grad_accum": 1, "lr": 1.0e-4,
            "max_steps": args.steps, "warmup_ratio": 0.0, "scheduler": "constant", "mixed_precision": "no",
            "gradient_checkpointing": False, "log_every": 1, "report_to": [], "seed": 42,
        },
        "checkpoint": {"every": 0, "keep_last": 1, "resume": "never"},
        "launch": {"accelerate_config": str(REPO / "accelerate_configs/cpu.yaml")},
    }  # fmt: skip


def run_one(args, spec: dict) -> dict:
    """One run in a fresh process tree; returns its measurements (or how far it got before a cap)."""
    import yaml

    run_dir = args.work / "runs" / spec["tag"]
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "out"
    recipe_path = run_dir / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe(args, spec["data"], out, spec["workers"]), sort_keys=False))
    cache = Path(spec["cache"])
    cold = not cache.exists() or not any(cache.rglob("*"))
    cache.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "VLMTUNE_CACHE_DIR": str(cache / "vlmtune"), "HF_DATASETS_CACHE": str(cache / "hf-datasets"),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads),
    }  # fmt: skip
    if spec["contender"] == "in-memory":
        cmd = [sys.executable, str(HERE / "vlm_in_memory.py"), str(recipe_path)]
    else:
        cmd = [sys.executable, "-m", "vlmtune.cli", "launch", str(recipe_path)]
        cmd += ["--procs-per-node", str(spec["procs"]), "--main-port", str(free_port())]
    load_before = load_average()
    w = watch(
        cmd, env=env, cwd=run_dir, log_path=run_dir / "log.txt", metrics_path=out / "metrics.jsonl",
        timeout=args.timeout, mem_cap_mb=args.mem_cap_gb * 1000, min_free_mb=args.min_free_gb * 1000,
    )  # fmt: skip
    result = {
        **{k: v for k, v in spec.items() if k != "data"},
        "cache_state": "cold" if cold else "warm",
        "status": w.status, "exit_code": w.exit_code, "wall_s": round(w.wall_s, 1),
        "load_before": load_before, "load_after": load_average(),
        "peak_rank_rss_mb": {r: round(v) for r, v in sorted(w.peak_rank_rss_mb.items())},
        "peak_rank_pss_mb": {r: round(v) for r, v in sorted(w.peak_rank_pss_mb.items())},
        "peak_tree_rss_mb": round(w.peak_tree_rss_mb), "peak_tree_pss_mb": round(w.peak_tree_pss_mb),
        "max_procs": w.max_procs, "timeline": w.timeline,
    }  # fmt: skip
    start, end = w.first(args.prep_start), w.first(args.prep_end)
    result["data_prep_s"] = round(end - start, 2) if start is not None and end is not None else None
    # Which ranks did the data work: each rank's CPU seconds over data preparation (one builder: the others ~0).
    result["prep_cpu_s"] = w.cpu_between(start, end) if start is not None and end is not None else None
    # Memory that holds the data (and imports, processor): each rank's RSS when data preparation ends, before
    # the model and the training steps (whose activations depend on which images the first steps draw).
    result["data_ready_rss_mb"] = w.rss_at(end) if end is not None else None
    result["ttfs_s"] = round(w.metrics[0][0], 2) if w.metrics else None
    records = [m for _, m in w.metrics if "loss" in m]
    result["steps_done"] = len(records)
    if records:
        # A step's time from the loop's own clock: its trained tokens over its trained tokens per second.
        step_s, prev = [], 0
        for m in records:
            tokens = m["trained_tokens"] - prev
            prev = m["trained_tokens"]
            step_s.append(
                round(tokens / m["trained_tokens_per_sec"], 3) if m["trained_tokens_per_sec"] else None
            )
        result["step_s"] = step_s
        result["data_wait_frac"] = [m.get("data_wait_frac") for m in records]
        result["metrics_peak_mem_mb"] = max(m.get("peak_mem_mb", 0) for m in records)
        result["losses"] = [round(m["loss"], 5) for m in records[:3]]
    if w.status == "error":
        result["log_tail"] = [line for _, line in w.lines[-12:]]
    if w.status in ("timeout", "memory"):
        prog = w.progress()
        result["progress"] = list(prog) if prog else None
        gb = (w.timeline[-1][1] if w.timeline else w.peak_tree_pss_mb) / 1000
        if prog is None:
            at = "before any progress bar"
        elif prog[1] == spec["rows"]:
            at = f"at row {prog[0]:,} of {prog[1]:,}"
        else:  # the training bar: the data was ready
            at = f"at progress {prog[0]}/{prog[1]} (a bar after the data's)"
        why = {"timeout": f"time cap {args.timeout:g} s", "memory": f"memory cap {args.mem_cap_gb:g} GB"}[
            w.status
        ]
        if w.low_memory:
            why = f"machine below {args.min_free_gb:g} GB available"
        result["note"] = f"did not finish ({why}): {gb:.1f} GB after {w.wall_s:.0f} s {at}"
    return result


def plan(args, rows: int, data: Path, rnd: int) -> list[dict]:
    """The runs of one size in one round, in order (warm runs follow the cold run whose cache they reuse)."""
    cache1 = args.work / "caches" / f"r{rnd}-{rows}-p1"
    cache2 = args.work / "caches" / f"r{rnd}-{rows}-p2"
    base = {"rows": rows, "data": data, "round": rnd, "procs": 1, "workers": 0, "contender": "vlmtune"}
    runs = []

    def add(name, **kw):
        spec = {**base, **kw}
        spec["tag"] = f"r{rnd}-{rows}-{name}"
        runs.append(spec)

    vlm = "vlmtune" in args.contenders
    if "startup" in args.what and vlm:
        add("p1-w0-cold", measure="startup", cache=str(cache1), fresh=True)
        add("p1-w0-warm", measure="startup", cache=str(cache1))
    if "workers" in args.what:
        for w in args.workers:
            if vlm and not (w == 0 and "startup" in args.what):
                add(f"p1-w{w}", measure="workers", workers=w, cache=str(cache1))
        if "in-memory" in args.contenders:
            add("p1-in-memory", measure="workers", contender="in-memory", cache=str(cache1))
    if "ddp" in args.what and vlm:
        add("p2-w0-cold", measure="ddp", procs=2, cache=str(cache2), fresh=True)
        add("p2-w0-warm", measure="ddp", procs=2, cache=str(cache2))
    return runs


def brief(r: dict) -> str:
    if r["status"] in ("timeout", "memory"):
        return r["note"]
    if r["status"] == "error":
        return f"error (exit {r['exit_code']}): " + " | ".join(r.get("log_tail", [])[-3:])
    if r["status"] == "skipped":
        return r["note"]
    wait = _med(r.get("data_wait_frac", [])[1:])
    return (
        f"1st step {r['ttfs_s']} s, data prep {r['data_prep_s']} s, rank RSS {r['peak_rank_rss_mb']} MB, "
        f"tree PSS {r['peak_tree_pss_mb']} MB, RSS at data ready {r.get('data_ready_rss_mb')} MB, "
        f"prep CPU s per rank {r.get('prep_cpu_s')}, "
        f"step {_med(r.get('step_s', [])[1:])} s, data_wait {wait}, "
        f"load {r['load_before'][0]}"
    )


def _med(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def _fmt(v, digits=1):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}" if isinstance(v, float) else f"{v:,}"


def summarise(results: list[dict], work: Path) -> str:
    """A Markdown table of medians per configuration, then the capped runs with per-row extrapolations."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        key = (r["rows"], r["procs"], r["workers"], r["contender"], r.get("cache_state", "-"), r["measure"])
        groups.setdefault(key, []).append(r)
    lines = [
        "| rows | procs | workers | contender | cache | runs | time to 1st step | data prep | rows/s | "
        "prep CPU per rank | RSS at data ready | peak RSS per rank | tree PSS | step (2..N) | "
        "data_wait_frac (2..N) | load avg |",
        "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key in sorted(groups, key=lambda k: (k[0], k[5] != "startup", k[1], k[3], k[2], k[4] != "cold")):
        rows, procs, workers, who, cache, _ = key
        runs = groups[key]
        ok = [r for r in runs if r["status"] == "ok"]
        head = f"| {rows:,} | {procs} | {workers} | {who} | {cache} | {len(ok)}/{len(runs)} |"
        if not ok:
            lines.append(
                f"{head} {runs[0].get('note') or runs[0]['status']} |||||||||| {runs[0].get('load_before')} |"
            )
            continue
        prep = _med([r["data_prep_s"] for r in ok])
        rss = {
            rank: _med([r["peak_rank_rss_mb"].get(rank) for r in ok]) for rank in ok[0]["peak_rank_rss_mb"]
        }
        rss_s = " / ".join(f"{v:,.0f}" for v in rss.values()) + " MB"
        ready = _per_rank([r.get("data_ready_rss_mb") for r in ok], "{:,.0f}", " MB")
        cpus = [r["prep_cpu_s"] for r in ok if r.get("prep_cpu_s")]
        cpu_s = " / ".join(f"{_med([c.get(k) for c in cpus]):,.1f}" for k in cpus[0]) + " s" if cpus else "–"
        loads = ", ".join(f"{r['load_before'][0]:.1f}" for r in ok)
        lines.append(
            f"{head} {_fmt(_med([r['ttfs_s'] for r in ok]))} s | {_fmt(prep)} s | "
            f"{_fmt(rows / prep, 0) if prep else '–'} | {cpu_s} | {ready} | {rss_s} | {_fmt(_med([r['peak_tree_pss_mb'] for r in ok]), 0)} MB | "
            f"{_fmt(_med([_med(r['step_s'][1:]) for r in ok]), 2)} s | "
            f"{_fmt(_med([_med(r['data_wait_frac'][1:]) for r in ok]), 4)} | {loads} |"
        )  # fmt: skip
    lines += ["", *extrapolate(results)]
    return "\n".join(lines)


def _per_rank(values: list[dict | None], fmt: str, unit: str) -> str:
    """Medians per rank of per-rank dicts, as "a / b unit"."""
    values = [v for v in values if v]
    if not values:
        return "–"
    return " / ".join(fmt.format(_med([v.get(k) for v in values])) for k in values[0]) + unit


def _slope(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares (intercept, slope) of y over x."""
    if len(points) < 2 or len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - slope * mx, slope


def extrapolate(results: list[dict]) -> list[str]:
    """Per-row cost of data preparation, from finished runs of two sizes and from the progress of capped runs."""
    out = []
    ok = [r for r in results if r["status"] == "ok" and r["measure"] == "startup" and r["procs"] == 1]
    by_rows: dict[int, list[dict]] = {}
    for r in ok:
        by_rows.setdefault(r["rows"], []).append(r)
    if len(by_rows) >= 2:
        pts_mem = [(n, _med([r["peak_rank_rss_mb"].get(0) for r in rs])) for n, rs in by_rows.items()]
        pts_prep = [(n, _med([r["data_prep_s"] for r in rs])) for n, rs in by_rows.items()]
        fit_m, fit_p = _slope(pts_mem), _slope([p for p in pts_prep if p[1] is not None])
        if fit_m and fit_p:
            out.append(
                f"- finished 1-process runs ({', '.join(f'{n:,}' for n in sorted(by_rows))} rows): "
                f"{fit_m[1]:.2f} MB and {fit_p[1] * 1000:.0f} ms of data preparation per row; extrapolated: "
                + "; ".join(
                    f"{n:,} rows → {(fit_m[0] + fit_m[1] * n) / 1000:,.1f} GB, {(fit_p[0] + fit_p[1] * n) / 60:,.0f} min"
                    for n in (10_000, 100_000, 665_000)
                )
            )  # fmt: skip
    for r in results:
        if r["status"] not in ("timeout", "memory"):
            continue
        # Samples while the data bar (n of all rows) was the last progress shown, not the training bar.
        prep = [t for t in r["timeline"] if len(t) > 4 and t[3] > 0 and t[4] == r["rows"]]
        pts, tps = [(t[3], t[2]) for t in prep], [(t[3], t[0]) for t in prep]
        fm, ft = _slope(pts), _slope(tps)
        line = f"- {r['tag']}: {r['note']}"
        if fm and ft:
            n = r["rows"]
            line += (
                f"; during data preparation rank 0 grew {fm[1]:.2f} MB and took {ft[1] * 1000:.0f} ms per row, so "
                f"all {n:,} rows would need ~{(fm[0] + fm[1] * n) / 1000:,.1f} GB per rank and "
                f"~{(ft[0] + ft[1] * n) / 60:,.1f} min"
            )
        out.append(line)
    return out


def save(work: Path, meta: dict, results: list[dict]) -> None:
    tmp = work / "results.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    tmp.replace(work / "results.json")


def main(argv=None) -> int:
    import signal

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # killed: stop the current run's tree too
    args = parse_args(argv)
    if args.summary_of:
        saved = json.loads((args.summary_of / "results.json").read_text())
        for r in saved["results"]:  # JSON made the ranks strings
            for key in ("peak_rank_rss_mb", "peak_rank_pss_mb", "prep_cpu_s", "data_ready_rss_mb"):
                if r.get(key):
                    r[key] = {int(k): v for k, v in r[key].items()}
        print(summarise(saved["results"], args.summary_of))
        return 0
    from vlmtune.testing.tiny_vlm import build_tiny_vlm

    t0 = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    build_tiny_vlm("qwen2_vl", args.model_dir)
    data = {n: generate(n, seed=args.seed, root=args.data_root) for n in args.rows}
    import vlmtune

    meta = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"), "argv": sys.argv[1:],
        "vlmtune": str(Path(vlmtune.__file__).parent), "git": _git_head(), "cpus": os.cpu_count(),
        "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "data": {n: {"path": str(p), **describe(p)} for n, p in data.items()},
        "settings": {k: str(v) for k, v in vars(args).items()},
    }  # fmt: skip
    print(f"vlmtune from {meta['vlmtune']} ({meta['git']}); results in {args.work}")
    for n, d in meta["data"].items():
        print(f"data {n:,} rows: {json.dumps({k: v for k, v in d.items() if k != 'path'})}")
    results: list[dict] = []
    for rnd in range(args.rounds):
        for rows in args.rows:
            capped: set[int] = set()  # process counts of this size that hit a cap this round
            for spec in plan(args, rows, data[rows], rnd):
                if spec.pop("fresh", False):
                    shutil.rmtree(spec["cache"], ignore_errors=True)
                if spec["procs"] in capped and not args.no_skip:
                    r = {**{k: v for k, v in spec.items() if k != "data"}, "status": "skipped",
                         "note": "skipped: an earlier run of this size hit a cap", "load_before": load_average()}  # fmt: skip
                else:
                    r = run_one(args, spec)
                    if r["status"] in ("timeout", "memory"):
                        capped.add(spec["procs"])
                results.append(r)
                print(f"round {rnd + 1} {spec['tag']:24} {brief(r)}", flush=True)
                save(args.work, meta, results)
            shutil.rmtree(args.work / "caches", ignore_errors=True)  # the "after" index may be large
    print()
    print(summarise(results, args.work))
    print(
        f"\ntotal {time.time() - t0:.0f} s; results: {args.work / 'results.json'}; logs: {args.work}/runs/*/log.txt"
    )
    return 0


def _git_head() -> str:
    import subprocess

    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "log", "-1", "--format=%h %s"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "vlmtune"], capture_output=True, text=True
        )
        return head.stdout.strip() + (" (vlmtune/ modified)" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
