"""The image side of the plan: image tokens from the data's header sizes, and the vision tower's activations
against what autograd saves on the tiny Qwen2-VL (CPU, fp32).

Tolerance for the tower: ±10 %. The formula counts each block's LayerNorm inputs and statistics, the rotated
q and k, the qkv output, the attention output and log-sum-exp, the linear inputs and the MLP's activations, the
pixels (a fully trained tower) and the merger's inputs; it leaves out the RoPE tables' small copies and, with a
LoRA tower, counts the first block's norm as keeping its input although nothing before it needs a gradient.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vlmtune.config.load import load_recipe
from vlmtune.families import get_family
from vlmtune.model.lora import apply_lora
from vlmtune.model.meta import build_meta_model
from vlmtune.plan import plan_json, plan_recipe
from vlmtune.plan.vision import (
    ImageTokens,
    micro_batch_image_tokens,
    sample_image_tokens,
    tower_activation_bytes,
    tower_shape,
)
from vlmtune.testing.tiny_vlm import build_tiny_vlm

TOWER_TOL = 0.10
# Two images of 8 × 8 and 4 × 6 patches (Qwen2-VL: 14-pixel patches, 2 × 2 merged per token): 88 patches.
GRID = [[1, 8, 8], [1, 4, 6]]


@pytest.fixture(scope="module")
def tiny_qwen2_vl(tiny_vlm_root):
    return build_tiny_vlm("qwen2_vl", tiny_vlm_root / "qwen2_vl")


def _recipe(model_dir, tmp_path, data=None, **sections):
    raw = {
        "model": {"path": str(model_dir), "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": data or [{"path": str(tmp_path / "unused.jsonl")}], "max_length": 512},
        "train": {"output_dir": str(tmp_path / "out"), "micro_batch_size": 2, "mixed_precision": "no"},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return load_recipe(raw)


def _tower_saved_bytes(recipe, family) -> int:
    """Bytes autograd saves in one forward of the real tower (with the recipe's LoRA / freezing / checkpointing)."""
    model = family.load_class().from_pretrained(recipe.model.path, dtype=torch.float32)
    model.config.use_cache = False
    model = apply_lora(
        model,
        recipe.lora,
        quantized=False,
        gradient_checkpointing=recipe.train.gradient_checkpointing,
        family=family,
        vision=recipe.vision,
    )
    model.train()
    visual = model.get_base_model().model.visual
    grid = torch.tensor(GRID)
    pixels = torch.randn(int(grid.prod(-1).sum()), visual.patch_embed.proj.weight[0].numel())
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        visual(pixels, grid_thw=grid)
    return sum(seen.values())


@pytest.mark.parametrize(
    ("vision", "checkpointing"),
    [
        ({"tower": "full"}, False),
        ({"tower": "full"}, True),
        ({"tower": "lora", "projector": "full"}, False),
        ({"tower": "frozen", "projector": "full"}, False),
    ],
    ids=["full", "full-ckpt", "lora", "projector-only"],
)
def test_tower_activations_match_saved_tensors(tiny_qwen2_vl, tmp_path, one_thread, vision, checkpointing):
    family = get_family("qwen2_vl")
    recipe = _recipe(tiny_qwen2_vl, tmp_path, vision=vision, train={"gradient_checkpointing": checkpointing})
    shape = tower_shape(build_meta_model(recipe))
    patches = sum(t * h * w for t, h, w in GRID)
    est = tower_activation_bytes(
        shape, patches=patches, recipe=recipe, act_bytes=4, model_bytes=4, checkpointing=checkpointing
    )
    measured = _tower_saved_bytes(recipe, family)
    assert abs(est.stored - measured) <= TOWER_TOL * measured, f"estimate {est.stored:,} vs {measured:,}"
    assert (est.recompute > 0) == checkpointing
    assert (est.transient == 0) == (recipe.vision.tower != "frozen")  # a frozen tower's peak is transient
    print(f"tower activations: estimate {est.stored:,} vs measured {measured:,}")


def test_a_frozen_tower_keeps_nothing_and_counts_its_forward_peak(tiny_qwen2_vl, tmp_path):
    recipe = _recipe(tiny_qwen2_vl, tmp_path)
    est = tower_activation_bytes(
        tower_shape(build_meta_model(recipe)),
        patches=88,
        recipe=recipe,
        act_bytes=4,
        model_bytes=4,
        checkpointing=False,
    )
    assert est.stored == 0 and est.transient > 0


def _image_set(tmp_path, name: str, side: int, rows: int = 3):
    folder = tmp_path / name
    folder.mkdir()
    Image.new("RGB", (side, side), (200, 10, 10)).save(folder / "a.png")
    row = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What?"}],
            },
            {"role": "assistant", "content": "Red."},
        ]
    }
    missing = json.loads(json.dumps(row).replace("a.png", "missing.png"))  # skipped, as training drops it
    lines = [json.dumps(row) for _ in range(rows)] + [json.dumps(missing)]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return {"path": str(folder / "train.jsonl")}


def test_image_tokens_come_from_the_datas_header_sizes(tiny_qwen2_vl, tmp_path):
    """Small and large images give their own counts (Qwen2-VL: one token per 28 × 28 pixels), within the
    recipe's max_pixels (the tiny processor's own is smaller)."""
    counts = {}
    for name, side in (("small", 56), ("large", 224)):
        recipe = _recipe(
            tiny_qwen2_vl, tmp_path, data=[_image_set(tmp_path, name, side)], vision={"max_pixels": 224 * 224}
        )
        images, notes = sample_image_tokens(recipe, build_meta_model(recipe), None)
        assert images.exact and not notes
        assert len(images.per_row) == 3 and images.images == 3
        assert "sizes from their headers" in images.source
        counts[name] = images
    assert counts["small"].max == (56 // 28) ** 2
    assert counts["large"].max == (224 // 28) ** 2
    assert counts["small"].median == counts["small"].p95 == counts["small"].max
    assert 0 < counts["small"].share < counts["large"].share < 1


def test_unreadable_data_plans_the_largest_image(tiny_qwen2_vl, tmp_path):
    recipe = _recipe(tiny_qwen2_vl, tmp_path, vision={"max_pixels": 448 * 448})
    images, notes = sample_image_tokens(recipe, build_meta_model(recipe), None)
    assert images.max == (448 // 28) ** 2 and images.share == 1.0
    assert any("could not be sampled" in n for n in notes)


def test_packed_bins_count_their_image_patches(tiny_qwen2_vl, tmp_path):
    images = ImageTokens([100, 300], 2, 0.5, "test", True)
    padded = _recipe(tiny_qwen2_vl, tmp_path, data=None)
    assert micro_batch_image_tokens(images, padded, 2, 512) == 2 * 300
    packed = _recipe(tiny_qwen2_vl, tmp_path, data=None)
    packed = packed.model_copy(
        update={"data": packed.data.model_copy(update={"batching": "packed", "pack_length": 2048})}
    )
    assert micro_batch_image_tokens(images, packed, 2, 2048) == 2048  # half of 2 bins × 2048 tokens


def test_plan_counts_the_towers_activations(tiny_qwen2_vl, tmp_path):
    """A trained tower adds its activations to the plan's activation item; the summary reaches the JSON."""
    data = [_image_set(tmp_path, "large", 224)]
    size = {"max_pixels": 224 * 224}
    frozen = plan_recipe(_recipe(tiny_qwen2_vl, tmp_path, data=data, vision=size))
    trained = plan_recipe(_recipe(tiny_qwen2_vl, tmp_path, data=data, vision={"tower": "full", **size}))
    frozen_act, trained_act = (next(i for i in p.items if i.name == "activations") for p in (frozen, trained))
    assert trained_act.gpu > frozen_act.gpu
    assert "tower patches" in trained_act.note
    assert trained.image_tokens == 2 * 64 and trained.patches == 4 * trained.image_tokens
    js = plan_json(trained)["images"]
    assert js["tokens_per_row"] == {"median": 64, "p95": 64, "max": 64}
    assert any("image tokens per row: median 64" in n for n in trained.notes)
    assert not any("not included" in n for n in trained.notes)
