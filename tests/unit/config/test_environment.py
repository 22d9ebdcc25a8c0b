"""Checks of the machine a recipe will run on: files, packages, the model's kind, a writable output."""

from vlmtune.config.schema import Recipe


def test_a_family_detected_from_a_local_config_is_checked_too(tmp_path):
    """Without model.family, validate reads the local config.json: wrong image-size keys and a missing
    image_root are reported before anything is loaded."""
    import json

    from vlmtune.config.environment import environment_problems

    (tmp_path / "model").mkdir()
    (tmp_path / "model/config.json").write_text(json.dumps({"model_type": "llava"}))
    (tmp_path / "a.json").write_text("[]")
    recipe = Recipe.model_validate(
        {
            "model": {"path": str(tmp_path / "model")},
            "vision": {"max_pixels": 1_000_000},
            "data": {"train": [{"path": str(tmp_path / "a.json"), "image_root": str(tmp_path / "pics")}]},
            "train": {"output_dir": str(tmp_path / "out")},
        }
    )
    problems = environment_problems(recipe)
    assert any(p.startswith("vision.max_pixels: not an image-size setting of llava models") for p in problems)
    assert any(p.startswith("data.train.0.image_root: not a folder") for p in problems)
    (tmp_path / "pics").mkdir()
    (tmp_path / "model/config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    assert environment_problems(recipe) == []


def test_a_hub_dataset_id_is_not_a_missing_file(tmp_path, monkeypatch):
    from vlmtune.config.environment import environment_problems

    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model/config.json").write_text('{"model_type": "llama"}')

    def problems(path: str) -> list[str]:
        recipe = Recipe.model_validate(
            {
                "model": {"path": str(tmp_path / "model")},
                "data": {"train": [{"path": path, "split": "train"}]},
                "train": {"output_dir": str(tmp_path / "out")},
            }
        )
        return [p for p in environment_problems(recipe) if p.startswith("data.")]

    assert problems("HuggingFaceH4/ultrachat_200k") == []
    assert problems("data/train.jsonl")[0].startswith("data.train.0.path: file not found: data/train.jsonl")
    assert problems("./org/name") and problems("a/b/c")
