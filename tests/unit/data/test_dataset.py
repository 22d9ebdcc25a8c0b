"""build_dataset end to end: label masks, weights, bad-row and over-length policies, and the stats."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.unit.data.helpers import CHATML, build_tokenizer, chat, row, trained_runs, write_jsonl
from vlmtune.config.schema import DataConfig, DataSource
from vlmtune.data import IndexedDataset, build_dataset
from vlmtune.data.template import ChatTemplateError
from vlmtune.errors import DataError


def _cfg(**policies) -> DataConfig:
    return DataConfig(train=[DataSource(path="unused.jsonl")], **policies)


def _build(tokenizer, paths: list[Path], *, seed: int = 0, weights: list[float] | None = None, **policies):
    weights = weights or [1.0] * len(paths)
    sources = [DataSource(path=str(p), weight=w) for p, w in zip(paths, weights, strict=True)]
    return build_dataset(sources, _cfg(**policies), tokenizer, seed=seed)


def _row_numbers(tokenizer, dataset: IndexedDataset) -> list[int]:
    """Which source row each example is, read back from its trained reply ("number N, of course")."""
    numbers = []
    for item in dataset:
        reply = tokenizer.decode([t for t in item["labels"] if t != -100])
        numbers.append(int(re.fullmatch(r"number (\d+), of course<\|im_end\|>", reply).group(1)))
    return numbers


def test_items_hold_ids_and_aligned_labels_masking_the_prompt(tokenizer, tmp_path):
    messages = chat("What is two plus two?", "Four.", "And three plus three?", "Six.", system="Be terse.")
    path = write_jsonl(tmp_path / "a.jsonl", [{"messages": messages}])

    dataset = _build(tokenizer, [path])

    item = dataset[0]
    assert set(item) == {"input_ids", "labels"}
    assert len(item["labels"]) == len(item["input_ids"]) == dataset.lengths[0]
    trained = [label != -100 for label in item["labels"]]
    assert all(label in (-100, token) for label, token in zip(item["labels"], item["input_ids"], strict=True))
    assert trained_runs(tokenizer, item["input_ids"], trained) == ["Four.<|im_end|>", "Six.<|im_end|>"]
    assert dataset.stats.trained_tokens == sum(trained)
    assert dataset.stats.total_tokens == len(item["input_ids"])


def test_train_on_prompt_labels_every_token(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [row(0)])

    item = _build(tokenizer, [path], train_on_prompt=True)[0]

    assert item["labels"] == item["input_ids"]


def test_weights_take_a_seeded_half_and_repeat_twice(tokenizer, tmp_path):
    half = write_jsonl(tmp_path / "half.jsonl", [row(i) for i in range(10)])
    double = write_jsonl(tmp_path / "double.jsonl", [row(i) for i in range(100, 103)])

    dataset = _build(tokenizer, [half, double], weights=[0.5, 2.0], seed=1)

    numbers = _row_numbers(tokenizer, dataset)
    assert dataset.stats.per_source == {str(half): 5, str(double): 6}
    assert dataset.stats.rows_used == len(dataset) == 11
    assert dataset.stats.rows_read == 13
    picked = numbers[:5]
    assert len(set(picked)) == 5 and set(picked) < set(range(10)) and picked == sorted(picked)
    assert numbers[5:] == [100, 101, 102, 100, 101, 102]
    # The same seed gives the same subset; some other seed gives another.
    assert _row_numbers(tokenizer, _build(tokenizer, [half], weights=[0.5], seed=1)) == picked
    others = [_row_numbers(tokenizer, _build(tokenizer, [half], weights=[0.5], seed=s)) for s in (2, 3, 4)]
    assert any(o != picked for o in others)


def test_fractional_weight_above_one_is_whole_copies_then_a_subset(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [row(i) for i in range(4)])

    numbers = _row_numbers(tokenizer, _build(tokenizer, [path], weights=[1.5]))

    assert numbers[:4] == [0, 1, 2, 3]
    assert len(numbers) == 6 and len(set(numbers[4:])) == 2


def test_bad_row_raises_with_file_row_line_problem_and_expectation(tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = {"messages": [*chat("q", system="s"), {"role": "user", "content": "again"}, *chat("x", "a")[1:]]}
    write_jsonl(tmp_path / "data" / "train.jsonl", [row(i) for i in range(17)] + [bad])

    with pytest.raises(DataError) as caught:
        build_dataset([DataSource(path="data/train.jsonl")], _cfg(), tokenizer, seed=0)

    assert str(caught.value).startswith(
        "data/train.jsonl row 17 (line 18): message 2 has role 'user' after 'user'; "
        "expected user/assistant turns alternating, starting with user"
    )
    assert "on_bad_row: skip" in str(caught.value)


BAD = {
    "unparsable": '{"messages": [',
    "missing_key": {"prompt": "q"},
    "wrong_type": {
        "messages": [{"role": "user", "content": ["part"]}, {"role": "assistant", "content": "a"}]
    },
    "empty_conversation": {"messages": []},
    "unknown_role": {"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]},
    "no_assistant_turn": {"messages": [{"role": "user", "content": "q"}]},
    "role_order": {"messages": chat("q", "a", "q2")},
    "empty_content": {"messages": chat("q", "   ")},
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_each_bad_row_kind_raises_located_or_is_counted_under_skip(tokenizer, tmp_path, kind):
    path = write_jsonl(tmp_path / "a.jsonl", [row(0), "", BAD[kind], row(1)])

    with pytest.raises(DataError, match=re.escape(f"{path} row 1 (line 3): ")):
        _build(tokenizer, [path])

    dataset = _build(tokenizer, [path], on_bad_row="skip")
    assert dataset.stats.skipped_bad == {kind: 1}
    assert dataset.stats.rows_read == 3
    assert _row_numbers(tokenizer, dataset) == [0, 1]


def test_row_with_no_trained_token_is_a_bad_row(tmp_path):
    # A template that never renders assistant messages leaves nothing to train.
    hides_replies = CHATML.replace(
        "{% for m in messages %}", "{% for m in messages if m['role'] != 'assistant' %}"
    )
    tokenizer = build_tokenizer(hides_replies.replace("<|im_start|>assistant\n", ""))
    path = write_jsonl(tmp_path / "a.jsonl", [row(0)])

    with pytest.raises(DataError, match=r"row 0 \(line 1\): no token .* assistant reply"):
        _build(tokenizer, [path])
    with pytest.raises(DataError, match=r"no usable examples.*no_trained_tokens: 1"):
        _build(tokenizer, [path], on_bad_row="skip")


def test_template_problem_names_the_row(tmp_path):
    unstable = CHATML.replace("{{ m['content'] }}", "{% if loop.last %}[final] {% endif %}{{ m['content'] }}")
    path = write_jsonl(tmp_path / "a.jsonl", [row(0)])

    with pytest.raises(ChatTemplateError, match=r"row 0 \(line 1\): the chat template is not prefix-stable"):
        _build(build_tokenizer(unstable), [path], on_bad_row="skip")


def test_max_bad_fraction_stops_when_exceeded(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [row(0), row(1), row(2), BAD["role_order"]])

    with pytest.raises(
        DataError, match=r"1 of 4 rows \(25\.0%\) are bad.*max_bad_fraction=0\.2 .*role_order: 1"
    ):
        _build(tokenizer, [path], on_bad_row="skip", max_bad_fraction=0.2)
    assert len(_build(tokenizer, [path], on_bad_row="skip", max_bad_fraction=0.25)) == 3


def test_overlength_rows_are_dropped_raised_or_truncated(tokenizer, tmp_path):
    long_reply = {"messages": chat("tell me number 1", "number 1, of course " * 8)}
    path = write_jsonl(tmp_path / "a.jsonl", [row(0), long_reply])
    short, long = _build(tokenizer, [path]).lengths
    limit = (short + long) // 2
    assert short < limit < long

    dropped = _build(tokenizer, [path], max_length=limit)
    assert (len(dropped), dropped.stats.dropped_overlength, dropped.stats.truncated) == (1, 1, 0)

    with pytest.raises(
        DataError, match=rf"row 1 \(line 2\): {long} tokens, more than data.max_length={limit}"
    ):
        _build(tokenizer, [path], max_length=limit, on_overlength="raise")

    truncated = _build(tokenizer, [path], max_length=limit, on_overlength="truncate")
    full = _build(tokenizer, [path])[1]
    assert (len(truncated), truncated.stats.truncated, truncated.stats.dropped_overlength) == (2, 1, 0)
    assert truncated.lengths == [short, limit]
    assert truncated[1] == {key: value[:limit] for key, value in full.items()}


def test_truncation_that_leaves_no_trained_token_drops_the_row(tokenizer, tmp_path):
    long_prompt = {"messages": chat("tell me number 1 " * 20, "one")}
    path = write_jsonl(tmp_path / "a.jsonl", [row(0), long_prompt])
    short = _build(tokenizer, [path]).lengths[0]

    dataset = _build(tokenizer, [path], max_length=short, on_overlength="truncate")

    assert (len(dataset), dataset.stats.truncated, dataset.stats.dropped_overlength) == (1, 0, 1)


def test_stats_summary_and_dict(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [row(0), BAD["missing_key"], row(1)])

    stats = _build(tokenizer, [path], on_bad_row="skip").stats

    assert stats.to_dict()["skipped_bad"] == {"missing_key": 1}
    assert stats.to_dict()["per_source"] == {str(path): 2}
    summary = stats.summary()
    assert f"3 rows read, 2 examples ({path}: 2)" in summary
    assert "skipped 1 bad (missing_key: 1)" in summary
    assert f"{stats.total_tokens:,} tokens, {stats.trained_tokens:,} trained" in summary
    assert 0 < stats.trained_tokens < stats.total_tokens


def test_progress_bar_only_when_asked(tokenizer, tmp_path, capsys):
    path = write_jsonl(tmp_path / "a.jsonl", [row(0)])
    sources = [DataSource(path=str(path))]

    # No cache: a second build would take the rows from it and have nothing to tokenise.
    build_dataset(sources, _cfg(cache=False), tokenizer, seed=0, show_progress=False)
    assert "indexing" not in capsys.readouterr().err
    build_dataset(sources, _cfg(cache=False), tokenizer, seed=0, show_progress=True)
    assert f"indexing {path}" in capsys.readouterr().err
