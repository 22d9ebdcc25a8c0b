"""Cross-field rules of early stopping, the best checkpoint and sample answers: each needs evaluations."""

import pytest

from vlmtune.config.rules import cross_field_problems
from vlmtune.config.schema import Recipe

EVAL = {"train": [{"path": "a.json"}], "eval": [{"path": "b.json"}]}


def _problems(data: dict | None = None, **sections) -> list[str]:
    train = {"output_dir": "out", **sections.pop("train", {})}
    recipe = Recipe.model_validate(
        {
            "model": {"path": "org/name"},
            "data": data or {"train": [{"path": "a.json"}]},
            "train": train,
            **sections,
        }
    )
    return cross_field_problems(recipe)


@pytest.mark.parametrize(
    ("data", "sections", "expected"),
    [
        (None, {"train": {"early_stopping": {"patience": 2}}}, "train.early_stopping: it watches the eval loss, "
         "which needs eval data: add data.eval"),
        (EVAL, {"train": {"early_stopping": {"patience": 2}}}, "train.eval_every: 0 measures only at the end"),
        (None, {"checkpoint": {"keep_best": True}}, "checkpoint.keep_best: the best checkpoint is the one with"),
        (EVAL, {"checkpoint": {"export": "best"}}, "checkpoint.export: best exports the best checkpoint's adapter"),
        (None, {"train": {"eval_samples": 2}}, "train.eval_samples: answers are generated for eval prompts"),
    ],
)  # fmt: skip
def test_each_needs_what_it_reads(data, sections, expected):
    problems = _problems(data, **sections)
    assert len(problems) == 1 and expected in problems[0], problems


def test_a_complete_setup_has_no_problem():
    sections = {
        "train": {"early_stopping": {"patience": 2, "min_delta": 0.01}, "eval_every": 10, "eval_samples": 2},
        "checkpoint": {"keep_best": True, "export": "best"},
    }
    assert _problems(EVAL, **sections) == []


def test_patience_is_required_and_positive():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="patience"):
        _problems(EVAL, train={"early_stopping": {"min_delta": 0.1}, "eval_every": 1})
    with pytest.raises(ValidationError, match="patience"):
        _problems(EVAL, train={"early_stopping": {"patience": 0}, "eval_every": 1})
