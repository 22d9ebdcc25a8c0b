"""Cross-field rules of data.batching, data.pack_length, data.group_by_length and train.micro_batch_tokens."""

import pytest

from vlmtune.config.rules import cross_field_problems
from vlmtune.config.schema import Recipe
from vlmtune.families import FAMILIES


def _recipe(data: dict, train: dict | None = None, model: dict | None = None) -> Recipe:
    return Recipe.model_validate(
        {
            "model": {"path": "org/name", **(model or {})},
            "data": {"train": [{"path": "a.json"}], "max_length": 512, **data},
            "train": {"output_dir": "out", **(train or {})},
        }
    )


@pytest.mark.parametrize(
    ("data", "train", "model", "expected"),
    [
        ({"pack_length": 1024}, {}, {}, "data.pack_length: only used with data.batching: packed"),
        (
            {"batching": "packed", "pack_length": 256},
            {},
            {},
            "data.pack_length: 256 is less than data.max_length",
        ),
        ({"batching": "packed", "group_by_length": True}, {}, {}, "data.group_by_length: groups rows to cut"),
        (
            {"batching": "packed"},
            {"micro_batch_tokens": 4096},
            {},
            "train.micro_batch_tokens: with data.batching",
        ),
        ({"group_by_length": True}, {"micro_batch_tokens": 4096}, {}, "already grouped by length"),
        (
            {"batching": "padding_free"},
            {"micro_batch_tokens": 100},
            {},
            "micro_batch_tokens: 100 is less than",
        ),
        (
            {"batching": "padding_free"},
            {},
            {"family": "mllama"},
            "not supported for mllama models",
        ),
    ],
)
def test_batching_problems(data, train, model, expected):
    problems = cross_field_problems(_recipe(data, train, model))
    assert len(problems) == 1 and expected in problems[0], problems


@pytest.mark.parametrize(
    ("data", "train"),
    [
        ({"batching": "packed", "pack_length": 2048}, {}),
        ({"batching": "padding_free"}, {"micro_batch_tokens": 4096}),
        ({"group_by_length": True}, {}),
        ({}, {"micro_batch_tokens": 512}),
    ],
)
def test_valid_batching_combinations(data, train):
    assert cross_field_problems(_recipe(data, train)) == []


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("batching", ["padding_free", "packed"])
def test_vision_language_packing_is_refused_exactly_where_the_registry_says(family, batching):
    problems = cross_field_problems(_recipe({"batching": batching}, {}, {"family": family}))
    reason = FAMILIES[family].packing_refused
    if reason:
        assert len(problems) == 1 and f"not supported for {family} models: {reason}" in problems[0]
    else:
        assert problems == []


def _method_recipe(method: str, data: dict, train: dict | None = None) -> Recipe:
    fmt = {"dpo": "preference", "grpo": "prompt"}[method]
    section = {"grpo": {"rewards": [{"name": "format"}]}} if method == "grpo" else {}
    return Recipe.model_validate(
        {
            "method": method,
            **section,
            "model": {"path": "org/name"},
            "data": {"train": [{"path": "a.jsonl", "format": fmt}], "max_length": 512, **data},
            "train": {"output_dir": "out", **(train or {})},
        }
    )


@pytest.mark.parametrize("method", ["dpo", "grpo"])
@pytest.mark.parametrize(
    ("data", "train", "expected"),
    [
        ({"batching": "packed"}, {}, "data.batching: method {m} needs data.batching: padded (now packed)"),
        ({"batching": "padding_free"}, {}, "set data.batching: padded"),
        ({}, {"micro_batch_tokens": 4096}, "train.micro_batch_tokens: method {m} counts a micro-batch in"),
        ({"train_on_prompt": True}, {}, "data.train_on_prompt: method {m} scores"),
    ],
)
def test_dpo_and_grpo_batch_whole_padded_pairs_or_prompts(method, data, train, expected):
    problems = cross_field_problems(_method_recipe(method, data, train))
    assert len(problems) == 1 and expected.format(m=method) in problems[0], problems


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_dpo_and_grpo_take_padded_batches_grouped_by_length(method):
    assert cross_field_problems(_method_recipe(method, {"group_by_length": True})) == []
