"""The public Python API in `vlmtune/__init__.py`: cheap to import, every name resolves, overrides in Python."""

import subprocess
import sys

import pytest

import vlmtune
from tests.conftest import REPO


def test_import_and_load_recipe_touch_no_gpu_and_no_heavy_package():
    code = (
        # The entry points' modules too: the CLI and `accelerate launch -m vlmtune.train` start with them.
        "import sys, vlmtune, vlmtune.train, vlmtune.cli, vlmtune.config.prepare\n"
        "assert vlmtune.__version__\n"
        f"recipe = vlmtune.load_recipe({str(REPO / 'recipes/demo/tiny_lora.yaml')!r}, {{'train.lr': 1e-4}})\n"
        "heavy = [m for m in ('torch', 'accelerate', 'transformers', 'peft', 'bitsandbytes', 'deepspeed')"
        " if m in sys.modules]\n"
        "import torch\n"
        "print(','.join(heavy), torch.cuda.is_initialized())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False"]  # nothing heavy imported, CUDA never initialised


def test_every_public_name_resolves():
    from vlmtune.config.load import load_recipe
    from vlmtune.notebook import notebook_launch
    from vlmtune.train import run

    assert vlmtune.load_recipe is load_recipe and vlmtune.run is run
    assert vlmtune.notebook_launch is notebook_launch
    for name in vlmtune.__all__:
        assert getattr(vlmtune, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        vlmtune.trian  # noqa: B018


def test_recipe_is_derived_in_python_with_dotted_or_nested_overrides(tiny_recipe):
    base = vlmtune.load_recipe(tiny_recipe())
    derived = vlmtune.load_recipe(base, {"train": {"lr": 1e-4}, "lora.r": 2})
    assert (derived.train.lr, derived.lora.r) == (1e-4, 2)
    assert derived.train.output_dir == base.train.output_dir  # a nested map changes one key, not the section
    assert (base.train.lr, base.lora.r) == (1e-2, 4)  # the original is left as it was

    from_file = vlmtune.load_recipe(REPO / "recipes/demo/tiny_lora.yaml")
    again = vlmtune.load_recipe(from_file, ["train.max_steps=20"])
    assert again.train.max_steps == 20 and again._base_dir == from_file._base_dir == REPO / "recipes/demo"


def test_a_recipe_changed_in_place_is_validated_again(tiny_recipe):
    recipe = vlmtune.load_recipe(tiny_recipe())
    recipe.train.lr = -1.0  # pydantic does not check assignments; run() re-validates through load_recipe
    with pytest.raises(vlmtune.RecipeError, match=r"train.lr: Input should be greater than 0"):
        vlmtune.load_recipe(recipe)
    with pytest.raises(
        vlmtune.RecipeError, match=r"train.lrr: unknown key; did you mean `lr`\? \[in overrides argument\]"
    ):
        vlmtune.load_recipe(tiny_recipe(), {"train": {"lrr": 1}})
