"""Every tracker the schema accepts is built, named as accelerate names it, and checked for its package."""

import typing

from vlmtune.config.environment import TRACKER_PACKAGES
from vlmtune.config.schema import TrainConfig
from vlmtune.engine.trackers import build_trackers


def _tracker_names() -> list[str]:
    (literal,) = typing.get_args(TrainConfig.model_fields["report_to"].annotation)
    return list(typing.get_args(literal))


def test_every_accepted_tracker_is_built_without_importing_its_package(tmp_path):
    names = _tracker_names()
    assert {"tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive"} <= set(names)
    train = TrainConfig(output_dir=str(tmp_path / "my-run"), report_to=names)
    trackers = build_trackers(train)
    assert [t.name for t in trackers] == names
    assert set(TRACKER_PACKAGES) == set(names)
    tensorboard = trackers[names.index("tensorboard")]
    assert (tensorboard.logging_dir_param, tensorboard.run_name) == (tmp_path / "my-run", "tensorboard")
    wandb = trackers[names.index("wandb")]
    assert wandb.run_name == "vlmtune" and wandb.init_kwargs == {
        "name": "my-run",
        "dir": str(tmp_path / "my-run"),
    }


def test_a_missing_tracker_package_is_a_problem_naming_the_package(tiny_recipe, monkeypatch):
    import importlib.util

    from vlmtune.config.environment import environment_problems
    from vlmtune.config.load import load_recipe

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "comet_ml" else real(n, *a))
    problems = environment_problems(load_recipe(tiny_recipe(train={"report_to": ["comet_ml"]})))
    assert "train.report_to: comet_ml needs the comet-ml package (pip install comet-ml)" in problems
