from pathlib import Path

import pytest
import yaml

from vlmtune.config.load import dump_recipe, load_recipe
from vlmtune.errors import RecipeError

REPO = Path(__file__).resolve().parents[3]


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def _minimal(tmp_path: Path) -> dict:
    return {
        "model": {"path": "org/model"},
        "data": {"train": [{"path": "train.jsonl"}]},
        "train": {"output_dir": str(tmp_path / "out")},
    }


def _problems(path, overrides=None) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return info.value.problems


def test_minimal_recipe_gets_defaults(tmp_path):
    r = load_recipe(_write(tmp_path / "r.yaml", _minimal(tmp_path)))
    assert r.lora.r == 16 and r.train.scheduler == "cosine" and r.checkpoint.resume == "auto"
    assert r._base_dir == tmp_path


def test_extends_merges_maps_deeply_and_later_files_win(tmp_path):
    _write(tmp_path / "base" / "a.yaml", {"lora": {"r": 4, "alpha": 8}, "train": {"lr": 1.0e-3, "seed": 1}})
    _write(tmp_path / "base" / "b.yaml", {"lora": {"r": 32}})
    child = _minimal(tmp_path) | {"extends": ["base/a.yaml", "base/b.yaml"]}
    child["train"]["seed"] = 7
    r = load_recipe(_write(tmp_path / "r.yaml", child))
    assert (r.lora.r, r.lora.alpha, r.train.lr, r.train.seed) == (32, 8, 1.0e-3, 7)


def test_extends_cycle_is_reported(tmp_path):
    _write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    _write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    assert "cycle" in _problems(tmp_path / "a.yaml")[0]


def test_overrides_are_typed_and_validated(tmp_path):
    path = _write(tmp_path / "r.yaml", _minimal(tmp_path))
    r = load_recipe(
        path, ["train.lr=1e-4", "lora.r=8", "lora.target_modules=[q_proj, v_proj]", "quant.bits=4"]
    )
    assert r.train.lr == 1e-4 and r.lora.r == 8 and r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.quant is not None and r.quant.bits == 4 and r.quant.type == "nf4"
    (problem,) = _problems(path, ["train.lrr=1"])
    assert "train.lrr: unknown key; did you mean `lr`?" in problem and "command-line override" in problem
    assert "expected KEY=VALUE" in _problems(path, ["train.lr"])[0]


def test_all_problems_reported_at_once_with_file_and_key(tmp_path):
    _write(tmp_path / "base.yaml", {"train": {"schedulr": "cosine"}})
    bad = _minimal(tmp_path) | {"extends": "base.yaml", "chekpoint": {}}
    bad["model"]["dtyp"] = "bfloat16"
    bad["lora"] = {"r": 0, "target_modules": []}
    bad["train"].update(micro_batch_size="four", optimizer="sgd")
    problems = _problems(_write(tmp_path / "r.yaml", bad))
    text = "\n".join(problems)
    assert len(problems) == 7, text
    assert "chekpoint: unknown key; did you mean `checkpoint`?" in text
    assert "model.dtyp: unknown key; did you mean `dtype`?" in text
    assert f"train.schedulr: unknown key; did you mean `scheduler`? [in {tmp_path / 'base.yaml'}]" in text
    assert "lora.r: Input should be greater than 0" in text
    assert "lora.target_modules" in text and "empty list" in text
    assert "train.micro_batch_size: expected a positive integer or auto (got 'four')" in text
    assert "train.optimizer: Input should be 'adamw', 'adamw_8bit' or 'paged_adamw_8bit'" in text


def test_cross_field_rules(tmp_path):
    bad = _minimal(tmp_path)
    bad["model"]["dtype"] = "bfloat16"
    bad["train"].update(mixed_precision="fp16", eval_every=10)
    text = "\n".join(_problems(_write(tmp_path / "r.yaml", bad)))
    assert "train.mixed_precision: fp16 with model.dtype bfloat16" in text
    assert "train.eval_every: evaluation is scheduled but data.eval lists no source" in text


def test_yaml_syntax_error_names_line(tmp_path):
    path = _write(tmp_path / "r.yaml", "model:\n  path: [unclosed\n")
    assert f"{path} line" in _problems(path)[0]


def test_missing_recipe_and_missing_extends(tmp_path):
    assert "recipe file not found" in _problems(tmp_path / "nope.yaml")[0]
    path = _write(tmp_path / "r.yaml", _minimal(tmp_path) | {"extends": "base/missing.yaml"})
    assert "base/missing.yaml" in _problems(path)[0] and "extended from" in _problems(path)[0]


def test_dump_roundtrip(tmp_path):
    r = load_recipe(_write(tmp_path / "r.yaml", _minimal(tmp_path)), ["lora.r=4"])
    dump_recipe(r, tmp_path / "resolved.yaml")
    again = load_recipe(tmp_path / "resolved.yaml")
    assert again.model_dump() == r.model_dump()


SHIPPED = sorted(p.relative_to(REPO) for p in (REPO / "recipes").rglob("*.yaml") if p.parent.name != "base")


@pytest.mark.parametrize("recipe", SHIPPED, ids=str)
def test_every_shipped_recipe_validates(recipe, monkeypatch):
    """Schema, cross-field rules and the environment checks that do not depend on built models."""
    from vlmtune.config.environment import environment_problems

    monkeypatch.chdir(REPO)
    r = load_recipe(recipe)
    problems = [p for p in environment_problems(r) if not p.startswith(("model.path", "train.output_dir"))]
    if r.quant is not None:  # bitsandbytes is a dev dependency; missing packages are reported, not crashes
        problems = [p for p in problems if "bitsandbytes" not in p]
    assert not problems


def test_shipped_recipes_exist():
    names = {str(p) for p in SHIPPED}
    assert {"recipes/7b_lora.yaml", "recipes/7b_qlora.yaml"} <= names
    vlm = {"qwen2_5_vl_7b_lora", "qwen2_5_vl_7b_qlora", "llava_1_5_7b_lora", "smolvlm2_2b_lora"}
    vlm |= {"gemma3_4b_lora", "qwen3_vl_8b_lora"}
    assert {f"recipes/{n}.yaml" for n in vlm} <= names
    assert any(n.startswith("recipes/demo/") for n in names)


def test_recipe_reference_is_current():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen", REPO / "scripts/gen_recipe_reference.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (REPO / "docs/recipe.md").read_text() == gen.render(), (
        "run: python scripts/gen_recipe_reference.py"
    )


def test_unquoted_no_means_no_mixed_precision(tmp_path):
    text = (
        "model: {path: org/model}\ndata: {train: [{path: train.jsonl}]}\n"
        f"train: {{output_dir: {tmp_path / 'out'}, mixed_precision: no}}\n"
    )
    assert load_recipe(_write(tmp_path / "r.yaml", text)).train.mixed_precision == "no"
    overridden = load_recipe(_write(tmp_path / "q.yaml", _minimal(tmp_path)), ["train.mixed_precision=no"])
    assert overridden.train.mixed_precision == "no"
