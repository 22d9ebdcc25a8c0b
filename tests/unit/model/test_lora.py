"""LoRA on vision-language models: what `all-linear` and the `vision` section adapt, freeze and save."""

from pathlib import Path

import pytest
import torch

from vlmtune.config.schema import LoraConfig, TrainConfig, VisionConfig
from vlmtune.engine.optim import build_optimizer
from vlmtune.errors import UserError
from vlmtune.families import get_family
from vlmtune.model.lora import apply_lora
from vlmtune.model.parts import part_of
from vlmtune.testing.tiny_vlm import build_tiny_vlm


@pytest.fixture(scope="session")
def tiny_vlms(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_vlms_lora")


def _lora(tiny_vlms: Path, name: str, lora: dict | None = None, **vision):
    family = get_family(name)
    model = family.load_class().from_pretrained(build_tiny_vlm(name, tiny_vlms / name), dtype=torch.float32)
    cfg = LoraConfig(r=2, alpha=4, **(lora or {}))
    peft_model = apply_lora(
        model,
        cfg,
        quantized=False,
        gradient_checkpointing=False,
        family=family,
        vision=VisionConfig(**vision),
    )
    return family, peft_model


def _trainable_parts(model, family) -> dict[str, set[str]]:
    """Per part, the kinds of trainable parameters: `lora` (adapters) or `full` (whole weights)."""
    parts: dict[str, set[str]] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            parts.setdefault(part_of(n, family), set()).add("lora" if "lora_" in n else "full")
    return parts


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "idefics3"])
def test_all_linear_adapts_the_language_model_only(tiny_vlms, name):
    family, model = _lora(tiny_vlms, name)
    assert _trainable_parts(model, family) == {"language": {"lora"}}


def test_a_target_list_stays_in_the_language_model(tiny_vlms):
    family, model = _lora(tiny_vlms, "llava", {"target_modules": ["q_proj"]})
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted and all(n.endswith("q_proj") and part_of(n, family) == "language" for n in adapted)


def test_tower_lora_adds_tower_adapters_not_projector_ones(tiny_vlms):
    family, model = _lora(tiny_vlms, "qwen2_vl", tower="lora")  # Qwen's projector sits inside its tower
    assert _trainable_parts(model, family) == {"language": {"lora"}, "vision": {"lora"}}


def test_full_parts_are_saved_with_the_adapter(tiny_vlms):
    family, model = _lora(tiny_vlms, "llava", tower="lora", projector="full")
    assert _trainable_parts(model, family) == {
        "language": {"lora"},
        "vision": {"lora"},
        "projector": {"full"},
    }
    saved = model.peft_config["default"].modules_to_save
    assert "model.multi_modal_projector" in saved


def test_a_full_projector_held_in_a_module_list_trains_whole(tiny_vlms):
    """Qwen3-VL's projector includes a ModuleList (the deepstack mergers), which PEFT cannot wrap as one."""
    family, model = _lora(tiny_vlms, "qwen3_vl", projector="full")
    projector = [(n, p) for n, p in model.named_parameters() if part_of(n, family) == "projector"]
    assert any("deepstack_merger_list" in n for n, _ in projector)
    assert all(p.requires_grad for n, p in projector if "original_module" not in n)
    assert _trainable_parts(model, family) == {"language": {"lora"}, "projector": {"full"}}


def test_full_tower_keeps_a_frozen_nested_projector_frozen(tiny_vlms):
    family, model = _lora(tiny_vlms, "qwen2_vl", tower="full")
    assert _trainable_parts(model, family) == {"language": {"lora"}, "vision": {"full"}}


def test_lora_projector_inside_a_full_tower_is_refused(tiny_vlms):
    with pytest.raises(UserError, match=r"vision\.projector: lora inside a fully trained tower"):
        _lora(tiny_vlms, "qwen2_vl", tower="full", projector="lora")


def test_per_part_learning_rates(tiny_vlms):
    family, model = _lora(tiny_vlms, "llava", tower="lora", projector="full")
    vision = VisionConfig(tower="lora", projector="full", tower_lr=1e-5)
    opt = build_optimizer(model, TrainConfig(output_dir="x", lr=1e-3), family=family, vision=vision)
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {part_of(names[id(p)], family): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs == {"language": 1e-3, "vision": 1e-5, "projector": 1e-3}
    trainable = sum(p.requires_grad for p in model.parameters())
    assert sum(len(g["params"]) for g in opt.param_groups) == trainable
