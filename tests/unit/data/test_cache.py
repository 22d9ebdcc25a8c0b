"""The data index cache: a second build reads no row and tokenises nothing; any change of input rebuilds."""

from __future__ import annotations

import pytest

from tests.unit.data.helpers import build_tokenizer, row, write_jsonl
from vlmtune.config.schema import DataConfig, DataSource
from vlmtune.data import Encoder, build_dataset


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """Count rows encoded; the cache lives in this test's folder."""
    monkeypatch.setenv("VLMTUNE_CACHE_DIR", str(tmp_path / "cache"))
    calls = {"n": 0}
    original = Encoder.encode

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(Encoder, "encode", counting)
    return calls


def _build(tokenizer, path, problems=None, **policies):
    cfg = DataConfig(train=[DataSource(path=str(path))], **policies)
    return build_dataset(cfg.train, cfg, tokenizer, seed=0, problems=problems)


def _examples(data):
    return [data[i] for i in range(len(data))]


def test_second_build_reuses_the_cache_and_replays_skipped_rows(tokenizer, tmp_path, counted):
    rows = [row(0), "{broken", row(1), {"messages": []}, row(2) | {"extra": 1}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    first_problems: list[dict] = []
    first = _build(tokenizer, path, first_problems, on_bad_row="skip")
    assert (
        counted["n"] == 3
    )  # the unparsable line never reaches the tokenizer; the empty conversation neither
    again_problems: list[dict] = []
    again = _build(tokenizer, path, again_problems, on_bad_row="skip")
    assert counted["n"] == 3  # nothing tokenised the second time
    assert _examples(again) == _examples(first) and len(first) == 3
    assert again.stats == first.stats and again.stats.skipped_total == 2
    assert again_problems == first_problems  # data-check sees the same report from the cache

    # Another row policy is another entry: the cached rows were built under `skip`.
    with pytest.raises(Exception, match="line 2"):
        _build(tokenizer, path, on_bad_row="raise")


def test_a_changed_file_tokenizer_or_length_invalidates_it(tokenizer, tmp_path, counted):
    path = write_jsonl(tmp_path / "a.jsonl", [row(0), row(1)])
    before = _build(tokenizer, path)
    assert counted["n"] == 2
    write_jsonl(path, [row(0), row(7)])  # same name and size, other content
    after = _build(tokenizer, path)
    assert counted["n"] == 4 and _examples(after) != _examples(before)
    assert _examples(_build(tokenizer, path)) == _examples(after) and counted["n"] == 4

    _build(tokenizer, path, max_length=64)
    assert counted["n"] == 6
    other = build_tokenizer(
        chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    _build(other, path)
    assert counted["n"] == 8


def test_cache_off_writes_nothing(tokenizer, tmp_path, counted):
    path = write_jsonl(tmp_path / "a.jsonl", [row(0)])
    _build(tokenizer, path, cache=False)
    _build(tokenizer, path, cache=False)
    assert counted["n"] == 2 and not (tmp_path / "cache").exists()
