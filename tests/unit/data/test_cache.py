"""The data index cache: a second build reads no row and tokenises nothing; any change of input rebuilds."""

from __future__ import annotations

import multiprocessing

import numpy as np
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


def test_a_parallel_build_equals_a_serial_one_and_stays_on_disk(tokenizer, tmp_path, monkeypatch):
    """Over the cores or in one process, the same examples, stats and bad-row journal; the tokens are
    memory-mapped from the index either way (cache on, or a removed temporary folder), never held in memory."""
    monkeypatch.setenv("VLMTUNE_CACHE_DIR", str(tmp_path / "cache"))
    rows = [row(i) if i % 997 else "{broken" for i in range(5000)]  # over the parallel threshold
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    cfg = DataConfig(train=[DataSource(path=str(path))], on_bad_row="skip", cache=False)
    serial_problems: list[dict] = []
    serial = build_dataset(cfg.train, cfg, tokenizer, seed=0, workers=1, problems=serial_problems)
    parallel_problems: list[dict] = []
    parallel = build_dataset(cfg.train, cfg, tokenizer, seed=0, workers=2, problems=parallel_problems)
    assert (
        len(parallel) == 5000 - 6 and serial.stats == parallel.stats and serial_problems == parallel_problems
    )
    assert serial.lengths == parallel.lengths
    assert all(serial[i] == parallel[i] for i in range(0, len(serial), 97))
    assert not (tmp_path / "cache").exists()  # cache off: nothing kept
    assert all(isinstance(p.tokens, np.memmap) for p in parallel._parts)


def _build_in_child(tokenizer, path, out) -> None:
    data = _build(tokenizer, path)
    out.put((len(data), data.stats.rows_read))


def test_processes_of_one_machine_build_the_index_once(tokenizer, tmp_path, monkeypatch):
    """Several processes starting together (the ranks of a run): one encodes, the others wait and map its
    files."""
    monkeypatch.setenv("VLMTUNE_CACHE_DIR", str(tmp_path / "cache"))
    log = tmp_path / "encoded.log"
    original = Encoder.encode

    def logged(*args, **kwargs):  # inherited by the forked children: each encoded row leaves a line
        with log.open("a") as f:
            f.write("x\n")
        return original(*args, **kwargs)

    monkeypatch.setattr(Encoder, "encode", logged)
    path = write_jsonl(tmp_path / "a.jsonl", [row(i) for i in range(300)])
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    children = [context.Process(target=_build_in_child, args=(tokenizer, path, out)) for _ in range(3)]
    for child in children:
        child.start()
    results = [out.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=60)
    assert results == [(300, 300)] * 3
    assert len(log.read_text().splitlines()) == 300  # one process encoded; two read its index
    entries = [p for p in (tmp_path / "cache" / "tokenized").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1
