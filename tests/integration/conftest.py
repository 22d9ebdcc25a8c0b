"""Fixtures of the multi-process tests."""

from pathlib import Path

import pytest
import yaml

from tests.integration.helpers import tiny_recipe_for_processes


@pytest.fixture(scope="module")
def recipe_file(tiny_model_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dist")
    recipe = tiny_recipe_for_processes(
        tiny_model_dir, tmp / "unused", grad_accum=2, max_steps=6, checkpoint={"every": 3, "keep_last": 3}
    )
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path
