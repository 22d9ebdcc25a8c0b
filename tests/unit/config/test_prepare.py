"""The prelude every entry point runs: every problem at once, and nothing refused that a normal run needs."""

import json

import pytest

from tests.conftest import REPO
from vlmtune.config.load import load_recipe
from vlmtune.config.prepare import prepare
from vlmtune.errors import RecipeError


def _model(tmp_path, model_type: str) -> str:
    """A model folder with only a config.json: what the checks read (no weights are needed)."""
    folder = tmp_path / model_type
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return str(folder)


def _recipe(tmp_path, model_type: str = "llama", **sections) -> dict:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "a.jsonl").write_text("")
    recipe = {
        "model": {"path": _model(tmp_path, model_type)},
        "data": {"train": [{"path": str(tmp_path / "a.jsonl")}]},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 5},
        "checkpoint": {"every": 0},
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    return recipe


def test_a_checkpoint_interval_longer_than_the_run_is_accepted_with_a_warning(tmp_path):
    prepared = prepare(_recipe(tmp_path, checkpoint={"every": 500}))
    [warning] = [w for w in prepared.warnings if w.startswith("checkpoint.every")]
    assert "500 is more than train.max_steps (5)" in warning and "only the final checkpoint" in warning
    assert not any(w.startswith("checkpoint.every") for w in prepare(_recipe(tmp_path / "b")).warnings)


@pytest.mark.parametrize("recipe", ["7b_lora.yaml", "7b_qlora.yaml"])
def test_a_short_run_of_a_shipped_recipe_loads(recipe):
    """`vlmtune validate recipes/7b_lora.yaml train.max_steps=100` used to fail on checkpoint.every."""
    loaded = load_recipe(REPO / "recipes" / recipe, ["train.max_steps=100"])
    assert loaded.checkpoint.every > loaded.train.max_steps


def test_a_cross_field_problem_and_a_missing_file_are_reported_together(tmp_path):
    recipe = _recipe(tmp_path, train={"eval_every": 10})  # scheduled evaluation without data.eval
    recipe["data"]["train"].append({"path": str(tmp_path / "missing.jsonl")})
    with pytest.raises(RecipeError) as caught:
        prepare(recipe)
    keys = [p.split(":")[0] for p in caught.value.problems]
    assert keys == ["train.eval_every", "data.train.1.path"], caught.value.problems


def test_an_unreadable_accelerate_config_is_one_problem_among_the_others(tmp_path):
    (tmp_path / "accel.yaml").write_text("distributed_type: [DEEPSPEED\n")
    recipe = _recipe(
        tmp_path, train={"eval_every": 10}, launch={"accelerate_config": str(tmp_path / "accel.yaml")}
    )
    with pytest.raises(RecipeError) as caught:
        prepare(recipe)
    keys = [p.split(":")[0] for p in caught.value.problems]
    assert keys == ["train.eval_every", "launch.accelerate_config"], caught.value.problems


@pytest.mark.parametrize(
    ("model_type", "sections", "expected"),
    [
        (
            "mllama",
            {"data": {"batching": "packed"}},
            "data.batching: packed is not supported for mllama models",
        ),
        ("paligemma", {"data": {"batching": "padding_free"}}, "data.batching: padding_free is not supported"),
        ("llama", {"vision": {"tower": "lora"}}, "vision: the model is not a vision-language model"),
    ],
)
def test_the_model_kind_comes_from_its_config_when_model_family_is_not_given(
    tmp_path, model_type, sections, expected
):
    with pytest.raises(RecipeError, match=expected):
        prepare(_recipe(tmp_path, model_type, **sections))


def test_llava_data_for_a_text_model_is_refused_before_anything_loads(tmp_path):
    recipe = _recipe(tmp_path, "llama")
    recipe["data"]["train"][0].update(format="llava", image_root=str(tmp_path))
    with pytest.raises(RecipeError) as caught:
        prepare(recipe)
    assert [p.split(":")[0] for p in caught.value.problems] == [
        "data.train.0.image_root",
        "data.train.0.format",
    ]
    recipe["model"]["path"] = _model(tmp_path, "llava")
    assert prepare(recipe).recipe.data.train[0].format == "llava"


def test_the_prelude_parses_the_accelerate_config_once_into_a_typed_spec(tmp_path):
    spec = prepare(
        _recipe(tmp_path, launch={"accelerate_config": str(REPO / "accelerate_configs/zero3_offload.yaml")})
    )
    spec = spec.launch
    assert (spec.strategy, spec.zero_stage, spec.offload_optimizer, spec.offload_params) == (
        "deepspeed",
        3,
        True,
        True,
    )
    assert (spec.num_processes, spec.num_machines, spec.shards_parameters) == (8, 1, True)
