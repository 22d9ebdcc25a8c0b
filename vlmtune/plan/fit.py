"""`vlmtune plan`: will this recipe fit, per GPU, before anything is launched?

The model is built on the meta device from its config (`vlmtune.model.meta`), the memory of each part of the
training state is estimated (`vlmtune.plan.memory`) and divided as the recipe's accelerate config shards it,
and the total is compared with the GPU's memory. When it does not fit, the plan tries the usual remedies one at a
time (checkpointing, a smaller micro-batch, ZeRO-3, QLoRA, offload) and names those that would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmtune.config.accelerate import load_launch_spec
from vlmtune.config.schema import QuantConfig, Recipe
from vlmtune.model.meta import MetaModel, build_meta_model
from vlmtune.plan.memory import (
    CUDA_OVERHEAD,
    GIB,
    NCCL_OVERHEAD,
    Item,
    LayerShape,
    Sharding,
    batch_activations,
    dtype_bytes,
    layer_shape,
    micro_batch_shape,
    parameters,
    peak_gpu,
)
from vlmtune.plan.methods import BATCH_ITEMS, generation_gather_items, method_items, method_notes
from vlmtune.plan.teacher import TEACHER_FORWARD, teacher_items
from vlmtune.plan.vision import ImageTokens, VisionPlan, vision_plan

_MAX_MICRO_BATCH = 4096


@dataclass
class Plan:
    """The estimate for one recipe on one kind of GPU."""

    model: str
    family: str | None
    sharding: Sharding
    method: str
    micro_batch: int
    seq: int
    checkpointing: bool
    frozen_params: int
    trainable_params: int
    items: list[Item]
    activations: dict[str, int]  # with and without checkpointing, whichever the recipe uses
    budget: int
    largest_micro_batch: int  # the largest value of `batch_key` that fits
    batch_key: str = "train.micro_batch_size"
    suggestions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    images: ImageTokens | None = None  # image tokens per row (vision-language models)
    image_tokens: int = 0  # image tokens of the fullest micro-batch
    patches: int = 0  # patches the vision tower sees in it
    batch_note: str = ""  # what one forward's micro-batch holds (`memory.micro_batch_shape`)

    @property
    def total_gpu(self) -> int:
        """The step's peak: what is held all step plus its largest phase (`memory.peak_gpu`)."""
        return peak_gpu(self.items)

    @property
    def total_cpu(self) -> int:
        return sum(i.cpu for i in self.items)

    @property
    def fits(self) -> bool:
        return self.total_gpu <= self.budget

    @property
    def biggest(self) -> Item:
        return max(self.items, key=lambda i: i.gpu)


@dataclass
class Estimate:
    """The per-GPU items of one recipe and sharding, with what the plan derives from them."""

    items: list[Item]
    total_params: int
    trainable_params: int
    activations: dict[str, int]  # with and without gradient checkpointing, at the recipe's micro-batch
    image_tokens: int = 0
    patches: int = 0


def _with_vision(lm: int, recipe: Recipe, sharding: Sharding, vision: VisionPlan | None, ckpt: bool) -> int:
    """The language model's activations plus the vision tower's: what it keeps for backward, and a frozen
    tower's transient forward peak where it exceeds what the language model holds later."""
    if vision is None:
        return lm
    tower = vision.activations(recipe, sharding, checkpointing=ckpt)[1]
    return tower.stored + max(lm + tower.recompute, tower.transient)


def estimate(
    meta: MetaModel,
    recipe: Recipe,
    sharding: Sharding,
    shape: LayerShape | None = None,
    vision: VisionPlan | None = None,
) -> Estimate:
    """The per-GPU items for `recipe` under `sharding` (`shape`: `layer_shape(meta)` when already known;
    `vision`: the image side of a vision-language model, whose tower's activations are counted)."""
    t, n = recipe.train, sharding.world
    p = parameters(meta, recipe, sharding)
    model_bytes = dtype_bytes(recipe, sharding)[0]
    shape = shape or layer_shape(meta)
    described = micro_batch_shape(recipe)[2]
    act = batch_activations(shape, recipe, sharding)
    alt = batch_activations(shape, recipe, sharding, checkpointing=not t.gradient_checkpointing)
    ckpt = t.gradient_checkpointing
    both = {
        ckpt: _with_vision(act.stored + act.recompute, recipe, sharding, vision, ckpt),
        not ckpt: _with_vision(alt.stored + alt.recompute, recipe, sharding, vision, not ckpt),
    }
    image_tokens = patches = 0
    vision_note = ""
    if vision is not None:
        image_tokens, tower = vision.activations(recipe, sharding)
        patches = tower.patches
        kept = "tower + projector" if recipe.vision.tower != "frozen" else "projector"
        vision_note = f"; {image_tokens:,} image tokens → {patches:,} tower patches: " + (
            f"{kept} keep {tower.stored / GIB:.2f} GiB"
            if tower.stored
            else f"frozen tower, forward peak {tower.transient / GIB:.2f} GiB"
        )

    def split(nbytes: int, sharded: bool, offloaded: bool) -> tuple[int, int]:
        part = nbytes // n if sharded else nbytes
        return (0, part) if offloaded else (part, 0)

    w_gpu, w_cpu = split(p.frozen_bytes, sharding.shards_weights, sharding.offload_params)
    a_gpu, a_cpu = split(p.trainable_bytes, sharding.shards_weights, sharding.offload_params)
    # Gradients live where the optimizer steps them (ZeRO offload: the fp32 partition on the CPU).
    g_gpu, g_cpu = split(p.grad_bytes, sharding.shards_gradients, sharding.offload_optimizer)
    o_gpu, o_cpu = split(p.optimizer_bytes, sharding.shards_optimizer, sharding.offload_optimizer)
    optim_kind = {"adamw": "AdamW", "adamw_8bit": "8-bit AdamW", "paged_adamw_8bit": "paged 8-bit AdamW"}
    items = [
        Item("weights (frozen base)", w_gpu, w_cpu, p.weights_note),
        Item("trainable weights (LoRA)", a_gpu, a_cpu, f"{p.trainable:,} parameters"),
        Item(
            "gradients",
            g_gpu * (2 if sharding.strategy == "ddp" else 1),
            g_cpu,
            "trainable only"
            + ("; DDP keeps a second copy in its buckets" if sharding.strategy == "ddp" else ""),
        ),
        Item(
            "optimizer states",
            o_gpu,
            o_cpu,
            optim_kind[t.optimizer]
            + (
                " m+v, fp32 master copies"
                if sharding.strategy == "deepspeed" and model_bytes == 2
                else " m+v"
            ),
        ),
    ]
    if sharding.shards_weights:
        gathered = 2 * p.largest_layer_bytes
        note = "the layer in use and the next (prefetch), unsharded"
        if sharding.strategy == "fsdp2" and not sharding.reshard_after_forward:
            gathered, note = (
                p.frozen_bytes + p.trainable_bytes,
                "reshard_after_forward false: all stay gathered",
            )
        items.append(Item("gathered layers", gathered, 0, note))
    items += [
        Item(
            "activations",
            both[ckpt],
            0,
            f"{described}, "
            + (
                f"checkpointed: layer inputs + one recomputed layer (without: {both[False] / GIB:.1f} GiB)"
                if t.gradient_checkpointing
                else f"no checkpointing (with: {both[True] / GIB:.1f} GiB)"
            )
            + vision_note,
            phase="train",
        ),
        Item(
            "logits + loss",
            act.logits_peak,
            0,
            "full-vocab logits, fp32 log-probs and their gradient",
            phase="train",
        ),
        Item(
            "CUDA context" + (" + NCCL" if n > 1 else ""),
            CUDA_OVERHEAD + (NCCL_OVERHEAD if n > 1 else 0),
            0,
            "outside PyTorch's allocator, and fragmentation",
        ),
    ]
    items += method_items(recipe, sharding, shape, act.per_layer)
    items += generation_gather_items(recipe, sharding, p.frozen_bytes + p.trainable_bytes, w_gpu + a_gpu)
    items += teacher_items(recipe, sharding)  # method: distill
    activations = {"checkpointed": both[True], "not_checkpointed": both[False]}
    return Estimate(items, p.total, p.trainable, activations, image_tokens, patches)


def plan_recipe(
    recipe: Recipe,
    *,
    gpus: int | None = None,
    gpu_mem_gib: float = 80.0,
    meta: MetaModel | None = None,
    vision: VisionPlan | None = None,
) -> Plan:
    """The memory plan of `recipe` on GPUs of `gpu_mem_gib` GiB; `gpus` overrides the accelerate config's count.

    `meta`: the recipe's meta model when already built (several plans of one model and LoRA; notebooks).
    `vision`: the image side when already sampled (`vlmtune.plan.vision.vision_plan`).
    """
    sharding = Sharding.from_spec(load_launch_spec(recipe), gpus)
    meta = meta or build_meta_model(recipe)
    if vision is None:
        vision = vision_plan(recipe, meta, recipe._base_dir)
    if recipe.train.micro_batch_size == "auto":
        return _auto_plan(recipe, gpus=gpus, gpu_mem_gib=gpu_mem_gib, meta=meta, vision=vision)
    budget = int(gpu_mem_gib * GIB)
    est = estimate(meta, recipe, sharding, vision=vision)
    t = recipe.train
    largest = _largest_batch(meta, recipe, sharding, budget, est, vision)
    plan = Plan(
        model=recipe.model.path,
        family=meta.family.name if meta.family else None,
        sharding=sharding,
        method=recipe.method,
        micro_batch=t.micro_batch_size,
        seq=recipe.data.max_length,
        checkpointing=t.gradient_checkpointing,
        frozen_params=est.total_params - est.trainable_params,
        trainable_params=est.trainable_params,
        items=est.items,
        activations=est.activations,
        budget=budget,
        largest_micro_batch=int(largest),
        batch_key=_batch_key(recipe),
        images=vision.images if vision else None,
        image_tokens=est.image_tokens,
        patches=est.patches,
        batch_note=micro_batch_shape(recipe)[2],
    )
    plan.suggestions = _suggestions(meta, recipe, plan, vision)
    plan.notes = _notes(recipe, plan) + (vision.notes if vision else [])
    return plan


def _auto_plan(recipe: Recipe, **kwargs) -> Plan:
    """The plan at the micro-batch `train.micro_batch_size: auto` would choose: the largest that fits (1 if none)."""
    from vlmtune.plan.autobatch import with_batch

    largest = plan_recipe(with_batch(recipe, 1, recipe.train.grad_accum), **kwargs).largest_micro_batch
    plan = plan_recipe(with_batch(recipe, max(largest, 1), recipe.train.grad_accum), **kwargs)
    plan.notes.insert(
        0,
        f"train.micro_batch_size auto: planned at {max(largest, 1)}, the largest that fits; at start-up training "
        "sizes it for its device (on a GPU confirmed by a probe) and caps it at the rows one step can use",
    )
    return plan


def _batch_key(recipe: Recipe) -> str:
    return "train.micro_batch_tokens" if recipe.train.micro_batch_tokens else "train.micro_batch_size"


def _with_batch(recipe: Recipe, value: int) -> Recipe:
    key = _batch_key(recipe).split(".")[1]
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={key: value})})


def _largest_batch(
    meta: MetaModel, recipe: Recipe, sharding: Sharding, budget: int, est: Estimate, vision: VisionPlan | None
) -> int:
    """The largest micro-batch (rows, or a token budget in steps of data.max_length) that fits; 0 if none.

    Only activations and logits depend on the micro-batch, so the rest of `est` is computed once.
    """
    step = recipe.data.max_length if recipe.train.micro_batch_tokens else 1
    shape = layer_shape(meta)
    per_batch = ("activations", "logits + loss", *BATCH_ITEMS, TEACHER_FORWARD)
    fixed = [i for i in est.items if i.name not in per_batch]

    def fits(n: int) -> bool:
        r = _with_batch(recipe, n * step)
        act = batch_activations(shape, r, sharding)
        ckpt = r.train.gradient_checkpointing
        train = _with_vision(act.stored + act.recompute, r, sharding, vision, ckpt) + act.logits_peak
        items = [
            *fixed,
            Item("train", train, phase="train"),
            *method_items(r, sharding, shape, act.per_layer),
            *(i for i in teacher_items(r, sharding) if i.name == TEACHER_FORWARD),
        ]
        return peak_gpu(items) <= budget

    if not fits(1):
        return 0
    lo, hi = 1, _MAX_MICRO_BATCH  # memory grows with the batch: bisect for the last size that fits
    if fits(hi):
        return hi * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step


def _total(meta: MetaModel, recipe: Recipe, sharding: Sharding, vision: VisionPlan | None = None) -> int:
    return peak_gpu(estimate(meta, recipe, sharding, vision=vision).items)


def _suggestions(meta: MetaModel, recipe: Recipe, plan: Plan, vision: VisionPlan | None = None) -> list[str]:
    """Single changes that make the recipe fit (when it does not), each with its new total; or speed-ups."""
    t, s = recipe.train, plan.sharding

    def train(**update) -> Recipe:
        return recipe.model_copy(update={"train": t.model_copy(update=update)})

    if plan.fits:
        if (
            t.gradient_checkpointing
            and _total(meta, train(gradient_checkpointing=False), s, vision) <= plan.budget
        ):
            return [
                "it also fits without gradient checkpointing (train.gradient_checkpointing=false: faster)"
            ]
        return []
    options: list[tuple[str, Recipe, Sharding]] = []
    if not t.gradient_checkpointing:
        options.append(("train.gradient_checkpointing=true", train(gradient_checkpointing=True), s))
    current = t.micro_batch_tokens or t.micro_batch_size
    if 0 < plan.largest_micro_batch < current:
        b = plan.largest_micro_batch
        accum = -(-current * t.grad_accum // b)  # about the same rows (tokens) per optimizer step
        label = f"{plan.batch_key}={b} train.grad_accum={accum}"
        options.append((label, _with_batch(recipe, b), s))
    if s.world > 1 and not s.shards_weights:
        zero3 = Sharding("deepspeed", s.world, zero_stage=3)
        options.append(
            (
                f"launch.accelerate_config=accelerate_configs/zero3.yaml (ZeRO-3 over {s.world} GPUs)",
                recipe,
                zero3,
            )
        )
    if recipe.quant is None:
        qlora = recipe.model_copy(update={"quant": QuantConfig(bits=4, storage_dtype=recipe.model.dtype)})
        label = f"quant.bits=4 quant.storage_dtype={recipe.model.dtype} (QLoRA)"
        options.append((label, qlora, s))
    # dpo / grpo score with methods.logps; distill's head is always chunked
    if t.loss == "standard" and recipe.method not in ("dpo", "grpo", "distill"):
        options.append(("train.loss=chunked", train(loss="chunked"), s))
    if t.optimizer == "adamw":
        options.append(("train.optimizer=adamw_8bit", train(optimizer="adamw_8bit"), s))
    if not s.offload_params:
        offload = Sharding("deepspeed", s.world, zero_stage=3, offload_optimizer=True, offload_params=True)
        label = (
            f"launch.accelerate_config=accelerate_configs/zero3_offload.yaml (over {s.world} GPU(s); slow)"
        )
        options.append((label, recipe, offload))
    out = []
    for label, r, sh in options:
        total = _total(meta, r, sh, vision)
        if total <= plan.budget:
            out.append(f"{label}: {total / GIB:.1f} GiB")
    if not out:
        out.append(
            "no single change fits: combine gradient checkpointing, micro-batch 1 and QLoRA, shorten "
            "data.max_length, or use more / larger GPUs with ZeRO-3"
        )
    return out


def _notes(recipe: Recipe, plan: Plan) -> list[str]:
    logits = next(i for i in plan.items if i.name == "logits + loss").gpu
    notes = [
        f"activations assume the fullest micro-batch ({micro_batch_shape(recipe)[2]}); "
        "batches of shorter rows take less",
    ]
    notes += method_notes(recipe, plan.items)
    if recipe.train.loss == "standard" and recipe.method not in ("dpo", "grpo", "distill"):
        notes.append(
            f"train.loss=chunked would avoid most of the {logits / GIB:.1f} GiB of logits + loss (same loss, "
            "computed a chunk of tokens at a time)"
        )
    if plan.images is not None:
        im = plan.images
        notes.append(
            f"image tokens per row: median {im.median:,}, p95 {im.p95:,}, max {im.max:,} "
            f"({im.source}{'' if im.exact else '; estimated from patch sizes'}); the micro-batch holds up to "
            f"{plan.image_tokens:,} image tokens ({plan.patches:,} tower patches)"
        )
    if recipe.train.optimizer == "paged_adamw_8bit":
        notes.append("paged optimizer states can move to CPU RAM under memory pressure (counted on the GPU)")
    if plan.sharding.offload_params or plan.sharding.offload_optimizer:
        notes.append(
            f"CPU RAM for offloaded state: {plan.total_cpu / GIB:.1f} GiB per process, "
            f"{plan.total_cpu * plan.sharding.world / GIB:.1f} GiB over all {plan.sharding.world}"
        )
    return notes
