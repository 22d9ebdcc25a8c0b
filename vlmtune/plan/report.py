"""The plan as text (`vlmtune plan`) and as JSON (`vlmtune plan --json`)."""

from __future__ import annotations

from dataclasses import asdict

from vlmtune.plan.fit import Plan
from vlmtune.plan.memory import GIB, phase_totals


def plan_json(plan: Plan) -> dict:
    """The plan as plain JSON types (bytes as integers)."""
    return {
        "model": plan.model,
        "family": plan.family,
        "method": plan.method,
        "sharding": {**asdict(plan.sharding), "label": plan.sharding.label},
        "micro_batch_size": plan.micro_batch,
        "max_length": plan.seq,
        "gradient_checkpointing": plan.checkpointing,
        "parameters": {"frozen": plan.frozen_params, "trainable": plan.trainable_params},
        "items": [asdict(i) for i in plan.items],
        "activations_bytes": plan.activations,
        "total_gpu_bytes": plan.total_gpu,
        "total_cpu_bytes": plan.total_cpu,
        "gpu_budget_bytes": plan.budget,
        "fits": plan.fits,
        "biggest_item": plan.biggest.name,
        "largest_micro_batch": plan.largest_micro_batch,
        "batch_key": plan.batch_key,
        "suggestions": plan.suggestions,
        "notes": plan.notes,
        "images": None
        if plan.images is None
        else {
            "rows_sampled": len(plan.images.per_row),
            "images_sampled": plan.images.images,
            "tokens_per_row": {"median": plan.images.median, "p95": plan.images.p95, "max": plan.images.max},
            "exact": plan.images.exact,
            "source": plan.images.source,
            "micro_batch_image_tokens": plan.image_tokens,
            "micro_batch_patches": plan.patches,
        },
    }


def format_plan(plan: Plan) -> str:
    """A table per item, the total against the GPU, the verdict and what to change."""
    s = plan.sharding
    total = plan.frozen_params + plan.trainable_params
    lines = [
        f"model       {plan.model}" + (f" ({plan.family})" if plan.family else ""),
        f"parameters  {total:,} total, {plan.trainable_params:,} trainable "
        f"({100 * plan.trainable_params / max(total, 1):.3f}%)",
        f"launch      {s.label} over {s.world} GPU(s); "
        + (
            f"micro-batch {plan.micro_batch} × {plan.seq} tokens"
            if plan.method == "sft" or not plan.batch_note
            else f"method {plan.method}, micro-batch {plan.batch_note}"
        )
        + f"; gradient checkpointing {'on' if plan.checkpointing else 'off'}",
        "",
        f"{'per GPU':<26} {'GiB':>8} {'CPU GiB':>8}  notes",
    ]
    phased = len(phase_totals(plan.items)) > 1
    for i in plan.items:
        cpu = f"{i.cpu / GIB:8.2f}" if i.cpu else " " * 8
        phase = f"[{i.phase}] " if phased and i.phase else ""
        lines.append(f"{i.name:<26} {i.gpu / GIB:8.2f} {cpu}  {phase}{i.note}")
    pct = 100 * plan.total_gpu / plan.budget
    total_cpu = f"{plan.total_cpu / GIB:8.2f}" if plan.total_cpu else " " * 8
    lines += [
        f"{'total':<26} {plan.total_gpu / GIB:8.2f} {total_cpu}  of {plan.budget / GIB:g} GiB ({pct:.0f}%)"
        + ("; held + the largest [phase]" if phased else ""),
        "",
    ]
    b = plan.biggest
    if plan.fits:
        lines.append(f"verdict: fits ({plan.total_gpu / GIB:.1f} of {plan.budget / GIB:g} GiB)")
    else:
        lines.append(
            f"verdict: does NOT fit ({plan.total_gpu / GIB:.1f} GiB > {plan.budget / GIB:g} GiB); "
            f"biggest item: {b.name} ({b.gpu / GIB:.1f} GiB)"
        )
    lines.append(
        f"largest micro-batch that fits: {plan.batch_key}={plan.largest_micro_batch}"
        + (" (not even the smallest)" if plan.largest_micro_batch == 0 else "")
    )
    lines += [("try: " if not plan.fits else "hint: ") + x for x in plan.suggestions]
    lines += [f"note: {x}" for x in plan.notes]
    return "\n".join(lines)
