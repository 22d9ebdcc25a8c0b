"""Reading data files: every supported kind, path resolution, and errors that say what and where."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, DatasetDict

from tests.unit.data.helpers import chat, row, write_jsonl
from vlmtune.config.schema import DataSource
from vlmtune.data.sources import Unparsable, find_path, load_source
from vlmtune.errors import DataError

ROWS = [row(i) for i in range(3)]


def _rows(loaded) -> list:
    return list(loaded.rows)


def test_jsonl_json_parquet_and_save_to_disk_load_the_same_rows(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "b.json").write_text(json.dumps(ROWS))
    Dataset.from_list(ROWS).to_parquet(str(tmp_path / "c.parquet"))
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "d"))
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:1])}).save_to_disk(
        str(tmp_path / "e")
    )

    for path in ("a.jsonl", "b.json", "c.parquet", "d", "e"):
        loaded = load_source(DataSource(path=str(tmp_path / path)))
        assert _rows(loaded) == ROWS, path
    assert _rows(load_source(DataSource(path=str(tmp_path / "e"), split="test"))) == ROWS[:1]


def test_json_file_holding_json_lines_loads(tmp_path):
    write_jsonl(tmp_path / "lines.json", ROWS)

    assert _rows(load_source(DataSource(path=str(tmp_path / "lines.json")))) == ROWS


def test_missing_split_lists_the_available_ones(tmp_path):
    DatasetDict({"validation": Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))

    with pytest.raises(DataError, match=r"no split 'train'.*available splits: validation"):
        load_source(DataSource(path=str(tmp_path / "dd")))


def test_split_on_a_plain_file_is_refused(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS)

    with pytest.raises(DataError, match=r"split 'test' is set.*remove `split`"):
        load_source(DataSource(path=str(tmp_path / "a.jsonl"), split="test"))


def test_unsupported_extension_lists_the_supported_ones(tmp_path):
    (tmp_path / "a.csv").write_text("instruction,output\nq,a\n")

    with pytest.raises(
        DataError, match=r"unsupported data file type '\.csv'; supported: \.jsonl, \.json, \.parquet"
    ):
        load_source(DataSource(path=str(tmp_path / "a.csv")))


def test_a_folder_of_data_files_is_a_dataset_repository(tmp_path):
    """A local dataset repository goes through the same `datasets.load_dataset` call as a hub id."""
    repo = tmp_path / "repo"
    write_jsonl(repo / "data" / "train.jsonl", ROWS)
    write_jsonl(repo / "data" / "test.jsonl", ROWS[:1])
    loaded = load_source(DataSource(path=str(repo)))
    assert _rows(loaded) == ROWS and loaded.is_repository
    assert _rows(load_source(DataSource(path=str(repo), split="test"))) == ROWS[:1]
    with pytest.raises(DataError, match=r"split 'dev'.*Check the path"):
        load_source(DataSource(path=str(repo), split="dev"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot load the dataset repository"):
        load_source(DataSource(path=str(tmp_path / "empty")))


def test_a_hub_id_is_loaded_by_name_and_anything_else_missing_is_not_found(monkeypatch, tmp_path):
    import datasets

    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return Dataset.from_list(ROWS)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    spec = DataSource(path="org/chat-data", name="en", split="validation", revision="v1")
    loaded = load_source(spec)
    assert _rows(loaded) == ROWS and loaded.label == "org/chat-data:en[validation]"
    assert calls == [("org/chat-data", {"name": "en", "split": "validation", "revision": "v1"})]
    for missing in ("data/train.jsonl", "./org/name", "a/b/c"):
        with pytest.raises(DataError, match="not found"):
            load_source(DataSource(path=missing))


def test_columns_map_the_sources_names_onto_the_formats(tmp_path):
    renamed = [{"dialogue": r["messages"], "messages": "unrelated"} for r in ROWS]
    write_jsonl(tmp_path / "a.jsonl", renamed)
    (tmp_path / "broken.jsonl").write_text(json.dumps(renamed[0]) + "\n{broken\n")
    for name in ("a.jsonl", "broken.jsonl"):  # through datasets, and through the line-by-line reader
        loaded = load_source(DataSource(path=str(tmp_path / name), columns={"messages": "dialogue"}))
        assert [r["messages"] for r in _rows(loaded) if not isinstance(r, Unparsable)] == [
            r["messages"] for r in ROWS[: len(loaded) - (name == "broken.jsonl")]
        ]
    with pytest.raises(DataError, match="'convo', which the source does not have"):
        load_source(DataSource(path=str(tmp_path / "a.jsonl"), columns={"messages": "convo"}))


def test_relative_path_resolves_against_cwd_first_then_the_recipe_folder(tmp_path, monkeypatch):
    recipes, work = tmp_path / "recipes", tmp_path / "work"
    write_jsonl(recipes / "data" / "train.jsonl", ROWS)
    (work / "data").mkdir(parents=True)
    monkeypatch.chdir(work)

    assert find_path("data/train.jsonl", recipes) == recipes / "data" / "train.jsonl"

    write_jsonl(work / "data" / "train.jsonl", ROWS)
    assert find_path("data/train.jsonl", recipes) == work / "data" / "train.jsonl"


def test_missing_file_names_the_path_where_it_looked_and_a_near_name(tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    write_jsonl(recipes / "data" / "train.jsonl", ROWS)
    monkeypatch.chdir(tmp_path)

    with pytest.raises(DataError) as caught:
        find_path("data/trian.jsonl", recipes)

    message = str(caught.value)
    assert "'data/trian.jsonl' not found" in message
    assert str(tmp_path / "data" / "trian.jsonl") in message
    assert str(recipes / "data" / "trian.jsonl") in message
    assert f"Did you mean '{recipes / 'data' / 'train.jsonl'}'" in message


def test_unparsable_jsonl_line_becomes_a_located_row(tmp_path, caplog):
    # U+2028 is legal raw inside a JSON string, and must not split a line when we re-read the file.
    odd = {"messages": chat("line\u2028separator", "ok")}
    path = write_jsonl(tmp_path / "a.jsonl", [ROWS[0], "", '{"messages": [oops', odd])

    loaded = load_source(DataSource(path=str(path)))

    assert len(loaded) == 3
    assert loaded.rows[0] == ROWS[0] and loaded.rows[2] == odd
    assert isinstance(loaded.rows[1], Unparsable)
    assert "not valid JSON" in loaded.rows[1].error
    assert loaded.where(1) == f"{path} row 1 (line 3)"
    assert "Failed to load JSON" not in caplog.text  # datasets' own report is kept out of the log


def test_line_numbers_count_only_newlines_and_skip_blank_lines(tmp_path):
    # A raw "\r" between JSON tokens and a raw U+2028 inside a string are not line breaks for JSON Lines.
    carriage_return = (
        '{"messages": [{"role": "user", "content": "q"},\r{"role": "assistant", "content": "a"}]}'
    )
    separator = {"messages": chat("a\u2028b", "c")}
    path = write_jsonl(tmp_path / "a.jsonl", ["", ROWS[0], "   ", carriage_return, "", separator, ROWS[1]])

    loaded = load_source(DataSource(path=str(path)))

    assert _rows(loaded) == [ROWS[0], {"messages": chat("q", "a")}, separator, ROWS[1]]
    assert [loaded.where(i) for i in range(4)] == [
        f"{path} row 0 (line 2)",
        f"{path} row 1 (line 4)",
        f"{path} row 2 (line 6)",
        f"{path} row 3 (line 7)",
    ]


def test_rows_that_arrow_cannot_unify_still_load(tmp_path):
    # A list where other rows hold an object: datasets fails on the schema; each row is then checked alone.
    path = write_jsonl(tmp_path / "a.jsonl", [ROWS[0], ["not", "a", "row"]])

    assert _rows(load_source(DataSource(path=str(path)))) == [ROWS[0], ["not", "a", "row"]]


def test_broken_json_array_names_line_and_column(tmp_path):
    (tmp_path / "a.json").write_text('[\n  {"messages": []},\n  {"messages": oops}\n]')

    with pytest.raises(DataError, match=r"a\.json: not valid JSON \(.* at line 3 column 16\)"):
        load_source(DataSource(path=str(tmp_path / "a.json")))
