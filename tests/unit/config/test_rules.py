"""Cross-field rules of the `vision` section and `model.family`."""

import pytest
from pydantic import ValidationError

from vlmtune.config.rules import cross_field_problems
from vlmtune.config.schema import Recipe


def _recipe(model: dict | None = None, **sections) -> Recipe:
    return Recipe.model_validate(
        {
            "model": {"path": "org/name", **(model or {})},
            "data": {"train": [{"path": "a.json"}]},
            "train": {"output_dir": "out"},
            **sections,
        }
    )


def test_unknown_family_lists_the_supported_ones():
    with pytest.raises(ValidationError, match="unknown model family 'qwen_vl'; supported: qwen2_vl, "):
        _recipe({"family": "qwen_vl"})


def test_vision_defaults_freeze_tower_and_projector():
    v = _recipe().vision
    assert (v.tower, v.projector, v.tower_lr, v.projector_lr) == ("frozen", "frozen", None, None)
    assert cross_field_problems(_recipe()) == []


def test_vision_section_is_closed():
    with pytest.raises(ValidationError, match=r"vision\.towr"):
        _recipe(vision={"towr": "lora"})


@pytest.mark.parametrize(
    ("model", "vision", "expected"),
    [
        ({}, {"tower_lr": 1e-5}, "vision.tower_lr: the tower is frozen"),
        ({}, {"projector_lr": 1e-5}, "vision.projector_lr: the projector is frozen"),
        ({}, {"min_pixels": 800, "max_pixels": 400}, "vision.min_pixels: 800 is more than"),
        ({"family": "llava"}, {"max_pixels": 400}, "vision.max_pixels: not an image-size setting of llava"),
        ({"family": "qwen2_5_vl"}, {"longest_edge": 512}, "vision.longest_edge: not an image-size setting"),
        ({"family": "smolvlm"}, {"min_pixels": 4}, "(image-size keys: vision.longest_edge)"),
    ],
)
def test_vision_problems(model, vision, expected):
    problems = cross_field_problems(_recipe(model, vision=vision))
    assert len(problems) == 1 and expected in problems[0], problems


def test_family_image_size_keys_accepted():
    assert (
        cross_field_problems(_recipe({"family": "qwen2_vl"}, vision={"min_pixels": 4, "max_pixels": 8})) == []
    )
    assert cross_field_problems(_recipe({"family": "idefics3"}, vision={"longest_edge": 64})) == []
    ok = {"tower": "lora", "tower_lr": 1e-5, "projector": "full", "projector_lr": 1e-4}
    assert cross_field_problems(_recipe(vision=ok)) == []


def test_full_training_of_a_quantised_part_is_refused_unless_it_stays_float():
    problems = cross_field_problems(_recipe(vision={"projector": "full"}, quant={"bits": 4}))
    assert (
        "vision.projector: full training of a quantised projector is not possible; set quant.vision: float"
        in ("\n".join(problems))
    )
    assert (
        cross_field_problems(_recipe(vision={"projector": "full"}, quant={"bits": 4, "vision": "float"}))
        == []
    )


def test_llava_format_and_image_root_parse():
    recipe = Recipe.model_validate(
        {
            "model": {"path": "org/name"},
            "data": {
                "train": [{"path": "a.json", "format": "llava", "image_root": "imgs", "image_key": "img"}]
            },
            "train": {"output_dir": "out"},
        }
    )
    assert recipe.data.train[0].format == "llava" and recipe.data.train[0].image_root == "imgs"


def test_offloading_without_checkpointing_is_a_warning():
    from vlmtune.config.rules import recipe_warnings

    recipe = _recipe(
        train={"output_dir": "out", "activation_offloading": True, "gradient_checkpointing": False}
    )
    assert [w.split(":")[0] for w in recipe_warnings(recipe)] == ["train.activation_offloading"]
    assert recipe_warnings(_recipe(train={"output_dir": "out", "activation_offloading": True})) == []


def test_unknown_loss_lists_the_choices():
    with pytest.raises(ValidationError, match=r"train\.loss\n.*'standard', 'chunked' or 'liger'"):
        _recipe(train={"output_dir": "out", "loss": "fused"})
