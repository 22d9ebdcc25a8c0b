"""Security defaults: no unsafe deserialisation anywhere in the code, remote code off unless asked and pinned."""

import ast
from pathlib import Path

from tests.conftest import REPO
from vlmtune.config.load import load_recipe
from vlmtune.config.rules import recipe_warnings
from vlmtune.config.schema import ModelConfig

SOURCES = sorted([*(REPO / "vlmtune").rglob("*.py"), *(REPO / "scripts").rglob("*.py")])


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_every_torch_load_is_weights_only_and_nothing_unpickles():
    unsafe = []
    for path in SOURCES:
        for call, name in _calls(path):
            where = f"{path.relative_to(REPO)}:{call.lineno}"
            if name.endswith("torch.load"):
                flags = {k.arg: k.value for k in call.keywords}
                if not (
                    isinstance(flags.get("weights_only"), ast.Constant)
                    and flags["weights_only"].value is True
                ):
                    unsafe.append(f"{where}: torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "dill.load", "joblib.load"):
                unsafe.append(f"{where}: {name}")
            if name in ("numpy.load", "np.load"):  # safe only with pickles refused
                flags = {k.arg: k.value for k in call.keywords}
                if not (
                    isinstance(flags.get("allow_pickle"), ast.Constant)
                    and flags["allow_pickle"].value is False
                ):
                    unsafe.append(f"{where}: {name} without allow_pickle=False")
            for k in call.keywords:
                if (
                    k.arg == "trust_remote_code"
                    and isinstance(k.value, ast.Constant)
                    and k.value.value is True
                ):
                    unsafe.append(f"{where}: trust_remote_code=True hard-coded")
    assert len(SOURCES) > 20 and not unsafe, unsafe


def test_remote_code_is_off_by_default_and_warned_about_unpinned(tiny_recipe):
    assert ModelConfig(path="x").trust_remote_code is False
    recipe = tiny_recipe()
    assert recipe_warnings(load_recipe(recipe)) == []
    recipe["model"]["trust_remote_code"] = True
    [warning] = recipe_warnings(load_recipe(recipe))
    assert warning.startswith("model.trust_remote_code") and "model.revision" in warning
    recipe["model"]["revision"] = "0123abc"
    assert recipe_warnings(load_recipe(recipe)) == []
