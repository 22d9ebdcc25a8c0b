"""`vlmtune profile RECIPE [--steps N]`: measured memory and time by module, beside `vlmtune plan`'s estimate.

The recipe trains for N steps (default 3) in a scratch folder, so the run's own folder is untouched; only
`<output_dir>/profile/` is written. Step 1 warms up (the optimizer allocates its states there). The steps after it
are measured with `vlmtune.engine.memtrack`: the first measured step is timed by module and recorded by
`torch.profiler` (`trace.json`, for Perfetto or TensorBoard); the last one measures memory by module and splits the
step's peak into weights, gradients, optimizer states, activations and logits + loss (with 2 steps one step does
both, and its times include the memory tracking's overhead on the CPU). On a GPU the measured steps are also
recorded for PyTorch's memory visualiser (`memory_snapshot.pickle`, https://pytorch.org/memory_viz).

Under several processes each rank profiles itself: rank 0 writes `profile/`, rank N `profile/rank-N/`.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from vlmtune.engine.memtrack import HEAD, OPTIMIZER, OTHER, LiveBytes, Meter, StepMeter
from vlmtune.logging import get_logger, is_main_process

log = get_logger(__name__)

PROFILE_DIR = "profile"
MIB = 2**20
OFF = 0.10  # an estimate further than this from the measurement is called out ...
NOISE = 0.01  # ... unless the two differ by less than this share of the measured peak


@dataclass
class Profile:
    """What one rank measured, and the plan's estimate at the measured micro-batch shape."""

    device: str
    world: int
    rank: int
    shape: tuple[int, int]  # rows × tokens of the micro-batch whose activations were largest
    units: dict[str, dict]  # unit → forward_s, backward_s, forward_peak_added, backward_peak_added (bytes)
    measured: dict[str, int]  # the step's peak split by plan item (bytes); "total" is the peak
    outside_plan: int = 0  # allocated outside the plan's items (a GPU's cuBLAS workspaces): not in "total"
    estimate: dict[str, int] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        # This rank's part: a ZeRO-3 parameter is an empty placeholder for its partition (`ds_tensor`), a
        # sharded FSDP2 parameter a DTensor over its local shard.
        t = getattr(t, "ds_tensor", t)
        st = (t.to_local() if hasattr(t, "to_local") else t).untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def _units(model: torch.nn.Module, family) -> list[tuple[str, torch.nn.Module]]:
    """The units of the table: the vision tower and projector (VLMs) and each decoder block."""
    from vlmtune.plan.memory import largest_blocks

    units = []
    if family is not None:
        named = {n.removeprefix("base_model.model."): m for n, m in model.named_modules()}
        vision = next((p for p in family.vision if p in named), None)
        if vision:
            units.append(("vision tower", named[vision]))
        projector = next((p for p in family.projector if p in named), None)
        if projector and not (vision and projector.startswith(vision + ".")):
            units.append(("projector", named[projector]))
    meta = SimpleNamespace(model=model, family=family)
    blocks = largest_blocks(meta, "language" if family else None, suffixes=("layers", "layer", ".h"))
    units += [(f"decoder block {i}", b) for i, b in enumerate(blocks)]
    return units


class _Instrument:
    """Installed on the trainer by `train.run(on_trainer=...)`: measures steps 2..N as the module doc says."""

    def __init__(self, steps: int, out: Path) -> None:
        self.steps, self.out = steps, out
        self.profile: Profile | None = None

    def __call__(self, trainer) -> None:
        self.trainer = trainer
        acc = trainer.acc
        if acc.process_index:
            self.out = self.out / f"rank-{acc.process_index}"
        self.model = acc.unwrap_model(trainer.c.model)
        self.device = acc.device
        optimizer = trainer.c.optimizer
        self.optimizer = getattr(optimizer, "optimizer", optimizer)
        self.units = _units(self.model, trainer.c.family)
        self.head = (
            self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        )
        self._step = trainer.train_step
        trainer.train_step = self.step
        self.timed: dict = {}
        self.trace = None

    def step(self, micro_batches):
        i = self.trainer.state.step  # 0-based: this is step i + 1
        last = i == self.steps - 1
        if i == 0:
            if self.device.type == "cuda":
                torch.cuda.memory._record_memory_history(max_entries=200_000)
            return self._step(micro_batches)
        out = self._measure(micro_batches, memory=last, trace=i == 1)
        if last:
            self._finish()
        return out

    def _measure(self, micro_batches, *, memory: bool, trace: bool):
        acc, cuda = self.trainer.acc, self.device.type == "cuda"
        params = list(self.model.parameters())
        trainable = [p for p in params if p.requires_grad]
        states = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        base = _unique_bytes(params + list(self.model.buffers()) + states)
        live = None if cuda or not memory else LiveBytes(self.device, base)
        meter = Meter(self.device, live)
        sm = StepMeter(meter, self.units, self.head, timing=not memory or self.steps == 2)
        grads = {"now": 0, "at_peak": 0, "seen": set()}

        def counted(p):
            if id(p) not in grads["seen"] and p.grad is not None:
                grads["seen"].add(id(p))
                grads["now"] += p.grad.untyped_storage().nbytes()

        handles = [p.register_post_accumulate_grad_hook(counted) for p in trainable]
        forward_start = {"bytes": 0, "shape": (0, 0), "act": -1}

        def model_pre(module, args, kwargs):
            if not sm._in_backward:
                forward_start["bytes"] = meter.allocated()
                ids = kwargs.get("input_ids", args[0] if args else None)
                forward_start["now"] = tuple(ids.shape) if torch.is_tensor(ids) else (0, 0)

        def head_seen():
            held = meter.allocated() - forward_start["bytes"]
            if held > forward_start["act"]:
                forward_start["act"], forward_start["shape"] = held, forward_start.get("now", (0, 0))

        handles.append(self.model.register_forward_pre_hook(model_pre, with_kwargs=True))
        if self.head is not None:
            handles.append(self.head.register_forward_pre_hook(lambda m, a: head_seen()))
        if live is not None:
            live.on_peak = lambda: grads.__setitem__("at_peak", grads["now"])
        backward = acc.backward

        def timed_backward(loss, **kwargs):
            sm.backward_started()
            backward(loss, **kwargs)
            sm.backward_ended()

        sm.attach(self.optimizer)
        acc.backward = timed_backward
        profiler = None
        if trace:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            profiler = torch.profiler.profile(activities=activities)
            profiler.__enter__()
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            sm.begin_step()
            # Allocated before the step but no tensor of the model or optimizer (cuBLAS workspaces, on a GPU):
            # outside what the plan counts per item (its CUDA context item holds it).
            outside = max(meter.allocated() - base, 0) if cuda else 0
            if live is not None:
                with live:
                    out = self._step(micro_batches)
            else:
                out = self._step(micro_batches)
            sm.switch(OTHER, "forward")
        finally:
            acc.backward = backward
            sm.detach()
            for h in handles:
                h.remove()
            if profiler is not None:
                profiler.__exit__(None, None, None)
        if profiler is not None:
            self.trace = profiler
        if not memory or not self.timed:
            self.timed = {k: asdict(v) for k, v in sm.stats.items()}
        if memory:
            step_peak = sm.step_peak
            if cuda:  # the allocator cannot say which tensors were alive at its peak: count all gradients
                grads["at_peak"] = grads["now"]
            self._split(sm, step_peak, grads["at_peak"], forward_start, trainable, states, outside)
        return out

    def _split(
        self, sm: StepMeter, peak: int, grads: int, fwd: dict, trainable, states, outside: int
    ) -> None:
        """The step's peak by plan item; `total` is their sum, the peak less what was `outside` them."""
        frozen = _unique_bytes([p for p in self.model.parameters() if not p.requires_grad])
        lora = _unique_bytes(trainable)
        optim = _unique_bytes(states)
        buffers = _unique_bytes(list(self.model.buffers()))
        activations = max(fwd["act"], 0)
        peak -= outside
        rest = peak - frozen - lora - optim - grads - buffers
        logits = max(rest - activations, 0)
        activations = rest - logits
        memory = {k: asdict(v) for k, v in sm.stats.items()}
        units = {
            name: {
                "forward_s": self.timed.get(name, {}).get("forward_s", 0.0),
                "backward_s": self.timed.get(name, {}).get("backward_s", 0.0),
                "forward_peak_added": memory.get(name, {}).get("forward_peak_added", 0),
                "backward_peak_added": memory.get(name, {}).get("backward_peak_added", 0),
            }
            for name in [*(n for n, _ in self.units), HEAD, OPTIMIZER, OTHER]
        }
        acc = self.trainer.acc
        self.profile = Profile(
            device=str(self.device), world=acc.num_processes, rank=acc.process_index,
            shape=tuple(fwd["shape"]), units=units, outside_plan=outside,
            measured={
                "weights (frozen base)": frozen + buffers, "trainable weights (LoRA)": lora, "gradients": grads,
                "optimizer states": optim, "activations": activations, "logits + loss": logits, "total": peak,
            },
        )  # fmt: skip

    def _finish(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        files = {}
        if self.trace is not None:
            path = self.out / "trace.json"
            self.trace.export_chrome_trace(str(path))
            files["trace"] = str(path)
        if self.device.type == "cuda":
            path = self.out / "memory_snapshot.pickle"
            torch.cuda.memory._dump_snapshot(str(path))
            torch.cuda.memory._record_memory_history(enabled=None)
            files["memory_snapshot"] = str(path)
        if self.profile is not None:
            self.profile.files = files


def estimate_at(recipe, shape: tuple[int, int], world: int) -> dict[str, int]:
    """`vlmtune plan`'s items (bytes per process) for `recipe` at a micro-batch of exactly `shape` (rows, tokens);
    the CUDA context, outside PyTorch's allocator, is left out: the measurement cannot see it."""
    from vlmtune.plan import plan_recipe

    rows, seq = shape
    d, t = recipe.data, recipe.train
    data = {"max_length": seq}
    if d.batching == "packed":
        data = {"pack_length": seq, "max_length": min(d.max_length, seq)}
    train = {"micro_batch_size": rows, "micro_batch_tokens": None}
    at = recipe.model_copy(update={"data": d.model_copy(update=data), "train": t.model_copy(update=train)})
    at._base_dir = recipe._base_dir
    plan = plan_recipe(at, gpus=world)
    items = {i.name: i.gpu for i in plan.items if not i.name.startswith("CUDA context")}
    return {**items, "total": sum(items.values())}


def compare(measured: dict[str, int], estimate: dict[str, int]) -> list[tuple[str, int, int, str]]:
    """(item, estimated, measured, verdict) for every item of either; the verdict names an estimate that is off."""
    rows = []
    for name in [*estimate, *(k for k in measured if k not in estimate)]:
        est, got = estimate.get(name, 0), measured.get(name, 0)
        diff = est - got
        if abs(diff) <= max(OFF * got, NOISE * measured.get("total", 0)):
            verdict = "ok"
        else:
            pct = f"{100 * abs(diff) / got:.0f}%" if got else "none measured"
            verdict = f"estimate {'high' if diff > 0 else 'low'} by {abs(diff) / MIB:.1f} MiB ({pct})"
        rows.append((name, est, got, verdict))
    return rows


def format_units(units: dict[str, dict], top: int | None = None) -> str:
    """The table by module: time and memory added, forward and backward (the `top` slowest, or all)."""
    order = sorted(units, key=lambda n: -(units[n]["forward_s"] + units[n]["backward_s"]))
    lines = [f"{'module':<22} {'fwd ms':>9} {'bwd ms':>9} {'fwd +MiB':>9} {'bwd +MiB':>9}"]
    for name in order[:top] if top else order:
        u = units[name]
        lines.append(
            f"{name:<22} {1e3 * u['forward_s']:9.2f} {1e3 * u['backward_s']:9.2f} "
            f"{u['forward_peak_added'] / MIB:9.2f} {u['backward_peak_added'] / MIB:9.2f}"
        )
    return "\n".join(lines)


def format_comparison(rows: list[tuple[str, int, int, str]]) -> str:
    lines = [f"{'item':<26} {'plan MiB':>10} {'measured MiB':>13}  verdict"]
    for name, est, got, verdict in rows:
        lines.append(f"{name:<26} {est / MIB:10.2f} {got / MIB:13.2f}  {verdict}")
    return "\n".join(lines)


def profile_recipe(recipe, overrides: list[str] | dict | None = None, *, steps: int = 3) -> Profile:
    """Train `recipe` for `steps` steps in a scratch folder, measuring; write `<output_dir>/profile/`.

    Raises:
        UserError: fewer than 2 steps, or what training raises for the recipe.
    """
    from vlmtune.config.load import load_recipe
    from vlmtune.errors import UserError
    from vlmtune.train import run

    if steps < 2:
        raise UserError(f"--steps: {steps}; at least 2 are needed (the first one warms up)")
    loaded = load_recipe(recipe, overrides)
    out = Path(loaded.train.output_dir).expanduser().resolve() / PROFILE_DIR
    scratch = out / "scratch-run"
    train = {
        "output_dir": str(scratch), "max_steps": steps, "eval_every": 0, "report_to": [], "log_every": 1,
    }  # fmt: skip
    checkpoint = {"every": 0, "resume": "never", "keep_last": 1}
    scratch_recipe = loaded.model_copy(
        update={
            "train": loaded.train.model_copy(update=train),
            "checkpoint": loaded.checkpoint.model_copy(update=checkpoint),
            "data": loaded.data.model_copy(update={"eval": []}),
        }
    )
    scratch_recipe._base_dir = loaded._base_dir
    instrument = _Instrument(steps, out)
    try:
        run(scratch_recipe, on_trainer=instrument)
    finally:
        if is_main_process():  # the scratch run's files are rank 0's: the other ranks may finish first
            shutil.rmtree(scratch, ignore_errors=True)
    profile = instrument.profile
    resolved = instrument.trainer.c.recipe
    profile.estimate = estimate_at(resolved, profile.shape, profile.world)
    rows = compare(profile.measured, profile.estimate)
    out = instrument.out
    (out / "modules.txt").write_text(format_units(profile.units) + "\n")
    (out / "memory.txt").write_text(format_comparison(rows) + "\n")
    report = {
        **asdict(profile),
        "comparison": [dict(zip(("item", "plan", "measured", "verdict"), r, strict=True)) for r in rows],
    }
    (out / "profile.json").write_text(json.dumps(report, indent=2))
    profile.files.update(
        {
            "table": str(out / "modules.txt"),
            "memory": str(out / "memory.txt"),
            "json": str(out / "profile.json"),
        }
    )
    return profile


def format_profile(profile: Profile, top: int = 8) -> str:
    """What `vlmtune profile` prints: the slowest modules, and the measured peak beside the plan, item by item."""
    rows = compare(profile.measured, profile.estimate)
    off = [f"{name}: {verdict}" for name, _, _, verdict in rows if verdict != "ok"]
    rows_, seq = profile.shape
    lines = [
        f"profiled on {profile.device}, rank {profile.rank} of {profile.world}; largest micro-batch {rows_} × {seq}",
        "",
        format_units(profile.units, top),
        "",
        format_comparison(rows),
        "",
        ("estimates off: " + "; ".join(off)) if off else "every estimate is within 10% of the measurement",
    ]
    lines += [f"{kind}: {path}" for kind, path in profile.files.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m vlmtune.profile RECIPE [--steps N] [key=value ...]` (`accelerate launch -m` for several ranks)."""
    from vlmtune.cli import main as cli_main

    return cli_main(["profile", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
