"""Cross-field rules of `method:`: its section, the sections of other methods, and the data formats it reads."""

import pytest

from vlmtune.config.rules import cross_field_problems
from vlmtune.config.schema import Recipe

PROMPTS = {"train": [{"path": "p.jsonl", "format": "prompt"}]}
PAIRS = {"train": [{"path": "p.jsonl", "format": "preference"}]}
GRPO = {"rewards": [{"name": "format"}]}


def _problems(data: dict | None = None, **sections) -> list[str]:
    recipe = Recipe.model_validate(
        {
            "model": {"path": "org/name"},
            "data": data or {"train": [{"path": "a.json"}]},
            "train": {"output_dir": "out"},
            **sections,
        }
    )
    return cross_field_problems(recipe)


@pytest.mark.parametrize(
    ("data", "sections", "expected"),
    [
        (None, {"dpo": {"beta": 0.2}}, "dpo: this section configures method dpo, but the recipe's method is sft"),
        (PROMPTS, {"method": "grpo"}, "grpo: method grpo needs a grpo: section (at least its rewards)"),
        (None, {"method": "distill"}, "distill: method distill needs a distill: section (at least its teacher)"),
        (None, {"method": "dpo"}, "data.train.0.format: messages rows cannot train method dpo; it reads preference"),
        (PROMPTS, {"method": "dpo"}, "data.train.0.format: prompt rows cannot train method dpo"),
        (PAIRS, {"method": "grpo", "grpo": GRPO}, "data.train.0.format: preference rows cannot train method grpo"),
        (PROMPTS, {}, "data.train.0.format: prompt rows cannot train method sft"),
        (PAIRS, {"method": "dpo", "dpo": {"loss": "ipo", "label_smoothing": 0.1}},
         "dpo.label_smoothing: the ipo loss has no label smoothing"),
        (PAIRS, {"method": "dpo", "train": {"output_dir": "out", "loss": "liger"}},
         "train.loss: liger is the sft loss's kernel; method dpo computes its own loss"),
    ],
)  # fmt: skip
def test_each_mismatch_is_named(data, sections, expected):
    problems = _problems(data, **sections)
    assert len(problems) == 1 and expected in problems[0], problems


@pytest.mark.parametrize(
    ("data", "sections"),
    [
        (None, {}),
        (PAIRS, {"method": "dpo"}),
        (PAIRS, {"method": "dpo", "dpo": {"loss": "simpo", "label_smoothing": 0.1}}),
        (PROMPTS, {"method": "grpo", "grpo": GRPO}),
        (None, {"method": "distill", "distill": {"teacher": "org/teacher"}}),
    ],
)
def test_a_matching_setup_has_no_problem(data, sections):
    assert _problems(data, **sections) == []
