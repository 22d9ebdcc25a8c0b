"""The image side of `vlmtune plan`: how many image tokens a micro-batch holds, and the vision tower's memory.

Image tokens come from the data when it can be read: the headers of up to `SAMPLE_ROWS` image rows (no pixel is
decoded) give each image's size, and the family's processor turns sizes into tokens exactly as training expands
them (`vlmtune.data.vision_tokens`). Without readable data, each row is planned with one image at the
processor's largest size (`vision.max_pixels`, else its own); without the processor (a hub model offline), from
the vision config's patch and merge sizes, and the plan says it is an estimate.

The tower's activations are derived per block, like the language model's (`vlmtune.plan.memory`), for the
patches the tower sees in one micro-batch (image tokens × merge², Qwen-VL's 2 × 2 patches per token):

- a trained tower keeps, per block, its LayerNorms' inputs (fp32) and statistics, the attention's q, k, v (and
  the rotated q and k when the tower uses RoPE), its output and log-sum-exp, the linear layers' inputs and the
  MLP's activations (3 tensors for QuickGELU or a gated MLP, 2 for GELU); with checkpointing only each block's
  input, plus one block recomputed in backward. A fully trained tower also keeps the pixels for its patch
  embedding. LoRA adds each adapter's A output.
- a trained projector keeps its own inputs, whether or not the tower trains.
- a frozen tower keeps nothing; its forward's transient peak (one block's tensors) comes before the language
  model's activations exist, so it counts only where it exceeds them.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlmtune.config.schema import Recipe
from vlmtune.model.meta import MetaModel
from vlmtune.plan.memory import Sharding, dtype_bytes, largest_blocks, micro_batch_shape

SAMPLE_ROWS = 256  # image rows sampled
READ_ROWS = 16 * SAMPLE_ROWS  # rows read at most per source to find them


@dataclass(frozen=True)
class ImageTokens:
    """Image tokens per row of a sample of the data (or of the planned largest image)."""

    per_row: list[int]  # image tokens of each sampled row that has images
    images: int  # images sampled
    share: float  # the largest fraction of a sampled row's tokens that are image tokens (1.0 when unknown)
    source: str  # where the counts come from, in words
    exact: bool  # counted by the family's processor (else estimated from patch and merge sizes)

    @property
    def median(self) -> int:
        return int(statistics.median(self.per_row)) if self.per_row else 0

    @property
    def p95(self) -> int:
        if not self.per_row:
            return 0
        ordered = sorted(self.per_row)
        return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]

    @property
    def max(self) -> int:
        return max(self.per_row, default=0)


def micro_batch_image_tokens(images: ImageTokens, recipe: Recipe, rows: int, seq: int) -> int:
    """Image tokens of the fullest micro-batch of `rows` × `seq` tokens (`memory.micro_batch_shape`).

    Padded: each row holds the most image tokens seen in a row (at most its length). Packed and padding-free: the
    micro-batch's tokens times the largest image share of a sampled row, so a bin of image-heavy rows counts its
    patches too (at most the micro-batch's tokens, and no fewer than one such row's images).
    """
    tokens = rows * seq
    if recipe.data.batching == "padded":
        return rows * min(images.max, seq)
    return min(tokens, max(images.max, math.ceil(tokens * images.share)))


@dataclass(frozen=True)
class TowerShape:
    """What the tower's activation formula reads from the vision config and the tower's first block."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    patch_values: int  # input values per patch (channels × temporal patch × patch²)
    merge: int  # patches per image token (Qwen-VL: spatial_merge_size², Idefics3: scale_factor²)
    act_tensors: int  # MLP activation tensors kept per patch and intermediate unit
    rope: bool
    out_hidden: int  # the projector's output width (the language model's hidden size)
    lora: list[tuple[int, int, float]] = field(default_factory=list)  # per adapted linear: in, rank, dropout


def tower_shape(meta: MetaModel) -> TowerShape | None:
    """The vision tower's sizes, or None for a text-only model or one without a vision config."""
    vc = getattr(meta.config, "vision_config", None)
    if meta.family is None or vc is None:
        return None
    hidden = getattr(vc, "embed_dim", None) or vc.hidden_size
    heads = getattr(vc, "num_heads", None) or vc.num_attention_heads
    intermediate = getattr(vc, "intermediate_size", None) or int(hidden * getattr(vc, "mlp_ratio", 4))
    merge = getattr(vc, "spatial_merge_size", None) or getattr(meta.config, "scale_factor", None) or 1
    blocks = largest_blocks(meta, "vision")  # the tower's blocks
    first = blocks[0] if blocks else torch.nn.Module()
    names = [n for n, m in first.named_modules() if isinstance(m, torch.nn.Linear)]
    lora = []
    for _, m in first.named_modules():
        if hasattr(m, "lora_A") and m.lora_A:
            adapter = next(iter(m.lora_A))
            a = m.lora_A[adapter]
            lora.append((a.in_features, a.out_features, float(getattr(m.lora_dropout[adapter], "p", 0.0))))
    gated = any("gate" in n for n in names)
    channels = getattr(vc, "in_channels", None) or getattr(vc, "num_channels", None) or 3
    act = str(getattr(vc, "hidden_act", "gelu"))
    return TowerShape(
        layers=len(blocks) or getattr(vc, "depth", None) or vc.num_hidden_layers,
        hidden=hidden,
        intermediate=intermediate,
        heads=heads,
        patch_values=channels * (getattr(vc, "temporal_patch_size", None) or 1) * vc.patch_size**2,
        merge=int(merge) ** 2,
        act_tensors=3 if gated or act == "quick_gelu" else 2,
        rope=any("rotary" in n for n, _ in meta.model.named_modules() if "visual" in n or "vision" in n),
        out_hidden=meta.config.get_text_config().hidden_size,
        lora=lora,
    )


@dataclass(frozen=True)
class TowerActivations:
    """The vision side's activation bytes for one micro-batch."""

    patches: int
    stored: int  # kept for backward by the forward (tower and projector)
    recompute: int  # one block recomputed during backward (gradient checkpointing), else 0
    transient: int  # a frozen tower's forward peak (one block's tensors and the pixels), kept by nothing


def tower_activation_bytes(
    shape: TowerShape, *, patches: int, recipe: Recipe, act_bytes: int, model_bytes: int, checkpointing: bool
) -> TowerActivations:
    """Bytes of the tower's and projector's activations for `patches` patches (see the module docstring).

    `act_bytes`: bytes of matmul outputs (2 under bf16/fp16 autocast, else the weights' dtype).
    """
    s, n, e = shape, patches, act_bytes
    d = s.hidden // s.heads
    norms = 2 * (4 * n * s.hidden + 8 * n)  # two LayerNorms: fp32 input, mean and rstd
    # norm outputs (qkv and fc1 inputs), q k v, attention output, proj input; rotated q and k with RoPE
    attn = (
        e * n * s.hidden * (2 + 3 + 2 + (2 if s.rope else 0)) + 4 * n * s.heads + (8 * n * d if s.rope else 0)
    )
    mlp = s.act_tensors * e * n * s.intermediate
    lora = sum(
        e * n * rank + ((n * width + e * n * width) if dropout > 0 else 0) for width, rank, dropout in s.lora
    )
    block = norms + attn + mlp + lora
    pixels = model_bytes * n * s.patch_values
    tower_trains = recipe.vision.tower != "frozen"
    projector = 0
    if tower_trains or recipe.vision.projector != "frozen":
        # Qwen-VL's merger: LayerNorm (fp32 input, stats), the merged input, the hidden and activated outputs;
        # a LLaVA-style projector: the features, and the hidden and activated outputs at the text width.
        if s.merge > 1:
            projector = 4 * n * s.hidden + 8 * n + 3 * e * n * s.hidden
        else:
            projector = e * n * (s.hidden + 2 * s.out_hidden)
    if not tower_trains:
        return TowerActivations(n, projector, 0, block + pixels)
    kept = pixels if recipe.vision.tower == "full" else 0
    if checkpointing:
        return TowerActivations(n, kept + s.layers * e * n * s.hidden + projector, block, 0)
    return TowerActivations(n, kept + s.layers * block + projector, 0, 0)


@dataclass(frozen=True)
class VisionPlan:
    """What the plan knows of a vision-language model's image side."""

    tower: TowerShape
    images: ImageTokens
    notes: list[str] = field(default_factory=list)

    def activations(
        self, recipe: Recipe, sharding: Sharding, checkpointing: bool | None = None
    ) -> tuple[int, TowerActivations]:
        """(image tokens, tower activations) of the recipe's fullest micro-batch."""
        rows, seq, _ = micro_batch_shape(recipe)
        tokens = micro_batch_image_tokens(self.images, recipe, rows, seq)
        model_bytes, _, autocast = dtype_bytes(recipe, sharding)
        # DeepSpeed runs the cast module: its matmul outputs are in the half type, like the weights.
        act = tower_activation_bytes(
            self.tower,
            patches=tokens * self.tower.merge,
            recipe=recipe,
            act_bytes=2 if autocast else model_bytes,
            model_bytes=model_bytes,
            checkpointing=recipe.train.gradient_checkpointing if checkpointing is None else checkpointing,
        )
        return tokens, act


def vision_plan(recipe: Recipe, meta: MetaModel, base_dir: Path | None) -> VisionPlan | None:
    """The image side of the plan, or None for a text-only model."""
    tower = tower_shape(meta)
    if tower is None:
        return None
    images, notes = sample_image_tokens(recipe, meta, base_dir)
    return VisionPlan(tower, images, notes)


def sample_image_tokens(
    recipe: Recipe, meta: MetaModel, base_dir: Path | None
) -> tuple[ImageTokens, list[str]]:
    """Image tokens per row from a sample of the training data, or of the largest image; notes on how."""
    from vlmtune.data.vision_tokens import UnsupportedImageSize
    from vlmtune.errors import UserError
    from vlmtune.model.load import load_processor

    notes: list[str] = []
    try:
        processor = load_processor(recipe.model, meta.family, recipe.vision, base_dir)
    except (UserError, OSError, ValueError) as exc:
        processor = None
        notes.append(
            f"the processor could not be loaded ({exc}); image tokens are estimated from patch sizes"
        )
    counts, shares, images = [], [], 0
    for sizes, text in _sample_rows(recipe, base_dir, notes):
        try:
            tokens = _row_image_tokens(processor, meta, recipe, sizes)
        except UnsupportedImageSize:  # the processor refuses it: training drops the row
            continue
        counts.append(tokens)
        images += len(sizes)
        if processor is None:
            shares.append(1.0)  # text lengths unknown without the tokenizer
        else:
            text_tokens = len(processor.tokenizer(text, add_special_tokens=False).input_ids)
            shares.append(tokens / (tokens + text_tokens))
    if counts:
        source = f"{images} image(s) in {len(counts)} sampled row(s), sizes from their headers"
        return ImageTokens(counts, images, max(shares), source, processor is not None), notes
    side = _largest_side(recipe, meta, processor)
    tokens = _row_image_tokens(processor, meta, recipe, [(side, side)])
    source = f"no readable image rows: one {side}×{side} image per row (the largest the settings allow)"
    return ImageTokens([tokens], 1, 1.0, source, processor is not None), notes


def _sample_rows(
    recipe: Recipe, base_dir: Path | None, notes: list[str]
) -> list[tuple[list[tuple[int, int]], str]]:
    """(image sizes, text) of up to SAMPLE_ROWS image rows of the training sources, read from headers only."""
    from vlmtune.data.bad_rows import BadRow
    from vlmtune.data.dataset import source_image_root
    from vlmtune.data.formats import flat_text, normalise
    from vlmtune.data.images import header_size
    from vlmtune.data.sources import Unparsable, load_source
    from vlmtune.errors import DataError

    out: list[tuple[list[tuple[int, int]], str]] = []
    for spec in recipe.data.train:
        if len(out) >= SAMPLE_ROWS:
            break
        try:
            loaded = load_source(spec, base_dir=base_dir)
            root = source_image_root(spec, loaded, base_dir)
            # Rows that training would drop (bad rows, bad images) are skipped here too; a text-heavy source
            # is read no further than READ_ROWS rows.
            for i in range(min(len(loaded), READ_ROWS)):
                if len(out) >= SAMPLE_ROWS:
                    break
                row = loaded.rows[i]
                if isinstance(row, Unparsable):
                    continue
                try:
                    conversation = normalise(row, spec.format, vision=True, image_key=spec.image_key)
                    if not conversation.images:
                        continue
                    sizes = [
                        header_size(im, source=loaded.label, row=i, index=j, image_root=root)
                        for j, im in enumerate(conversation.images)
                    ]
                except (BadRow, DataError):
                    continue
                text = "\n".join(flat_text(m) for m in conversation.messages)
                out.append((sizes, text))
        except (DataError, OSError) as exc:
            notes.append(f"data {spec.path} could not be sampled ({exc})")
    return out


def _row_image_tokens(processor, meta: MetaModel, recipe: Recipe, sizes: list[tuple[int, int]]) -> int:
    if processor is not None:
        from vlmtune.data.vision_tokens import image_replacements

        texts = image_replacements(processor, meta.family, sizes)
        return sum(len(processor.tokenizer(t, add_special_tokens=False).input_ids) for t in texts)
    vc = meta.config.vision_config
    merge = (getattr(vc, "spatial_merge_size", None) or getattr(meta.config, "scale_factor", None) or 1) ** 2
    patch = vc.patch_size
    fixed = getattr(vc, "image_size", None)
    total = 0
    for h, w in sizes:
        pixels = fixed**2 if fixed else min(h * w, recipe.vision.max_pixels or h * w)
        total += max(1, round(pixels / patch**2 / merge))
    return total


def _largest_side(recipe: Recipe, meta: MetaModel, processor) -> int:
    """The side of a square image at the largest size the recipe's (or processor's) settings allow."""
    if recipe.vision.max_pixels:
        return math.isqrt(recipe.vision.max_pixels)
    if recipe.vision.longest_edge:
        return recipe.vision.longest_edge
    size = getattr(getattr(processor, "image_processor", None), "size", None) or {}
    size = size if isinstance(size, dict) else dict(size.items()) if hasattr(size, "items") else vars(size)
    if size.get("longest_edge") and "shortest_edge" in size and size["longest_edge"] > 10_000:
        return math.isqrt(size["longest_edge"])  # Qwen-VL keeps max_pixels under longest_edge
    for key in ("longest_edge", "height", "shortest_edge"):
        if size.get(key):
            return int(size[key])
    return int(getattr(meta.config.vision_config, "image_size", None) or 1024)
