"""Preference and prompt rows through the one pipeline (text model): one indexed example per row, replies alone
trained, prompts ending with the generation prompt, lengths, over-length and bad-row policies, the cache."""

from __future__ import annotations

import pytest

from tests.unit.data.helpers import trained_runs, write_jsonl
from vlmtune.config.schema import DataConfig, DataSource
from vlmtune.data import build_dataset
from vlmtune.errors import DataError

PAIR = {"prompt": "what is two plus two", "chosen": "four", "rejected": "six of course"}
PROMPT_ONLY = {"prompt": "what is two plus two", "solution": "4", "images": ["never_read.png"], "id": 7}


def _build(tokenizer, path, fmt: str, **policies):
    sources = [DataSource(path=str(path), format=fmt)]
    return build_dataset(sources, DataConfig(train=sources, **policies), tokenizer, seed=0)


def _trained(tokenizer, example: dict) -> list[str]:
    return trained_runs(tokenizer, example["input_ids"], [label != -100 for label in example["labels"]])


def _render(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_preference_row_is_one_example_of_two_sequences_trained_on_the_replies(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIR])
    dataset = _build(tokenizer, path, "preference")

    assert len(dataset) == 1
    example = dataset[0]
    assert set(example) == {"chosen", "rejected"}
    chosen, rejected = example["chosen"], example["rejected"]
    user = {"role": "user", "content": PAIR["prompt"]}
    assert chosen["input_ids"] == _render(tokenizer, [user, {"role": "assistant", "content": "four"}])
    assert rejected["input_ids"] == _render(
        tokenizer, [user, {"role": "assistant", "content": "six of course"}]
    )
    assert _trained(tokenizer, chosen) == ["four<|im_end|>"]
    assert _trained(tokenizer, rejected) == ["six of course<|im_end|>"]
    # The sampler's cost is both sequences; every trained token is a reply's.
    assert dataset.lengths == [len(chosen["input_ids"]) + len(rejected["input_ids"])]
    trained = sum(label != -100 for e in (chosen, rejected) for label in e["labels"])
    assert dataset.trained_tokens() == trained == dataset.stats.trained_tokens


def test_earlier_replies_of_the_prompt_and_train_on_prompt_are_never_trained(tokenizer, tmp_path):
    prompt = [
        {"role": "user", "content": "tell me about the weather"},
        {"role": "assistant", "content": "the weather is terse"},
        {"role": "user", "content": "what is two plus two"},
    ]
    explicit = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "four"}], "rejected": "six"}
    implicit = {
        "chosen": [*prompt, {"role": "assistant", "content": "four"}],
        "rejected": [*prompt, {"role": "assistant", "content": "six"}],
    }
    path = write_jsonl(tmp_path / "pairs.jsonl", [explicit, implicit])
    dataset = _build(tokenizer, path, "preference", train_on_prompt=True)

    first, second = dataset[0], dataset[1]
    assert first == second  # the implicit prompt is the shared opening
    assert _trained(tokenizer, first["chosen"]) == ["four<|im_end|>"]
    assert _trained(tokenizer, first["rejected"]) == ["six<|im_end|>"]


def test_a_prompt_row_ends_with_the_generation_prompt_and_carries_its_prompt_and_columns(tokenizer, tmp_path):
    messages = [{"role": "system", "content": "be terse"}, {"role": "user", "content": "tell me"}]
    path = write_jsonl(tmp_path / "prompts.jsonl", [PROMPT_ONLY, {"prompt": messages, "solution": "6"}])
    dataset = _build(tokenizer, path, "prompt")

    first, second = dataset[0], dataset[1]
    user = [{"role": "user", "content": PROMPT_ONLY["prompt"]}]
    assert first["input_ids"] == _render(tokenizer, user, add_generation_prompt=True)
    assert tokenizer.decode(first["input_ids"]).endswith("<|im_start|>assistant\n")
    assert set(first["labels"]) == {-100}
    assert first["prompt"] == PROMPT_ONLY["prompt"]
    # The image column is not a column (a text model reads no image: no sizes either).
    assert first["columns"] == {"solution": "4", "id": 7, "image_sizes": []}
    assert second["input_ids"] == _render(tokenizer, messages, add_generation_prompt=True)
    # A field some rows lack is None in them, as in a table: every row has the same columns.
    assert second["prompt"] == messages
    assert second["columns"] == {"solution": "6", "id": None, "image_sizes": []}
    assert dataset.lengths == [len(first["input_ids"]), len(second["input_ids"])]
    # Columns are copies: a reward that edits them does not edit the data.
    second["columns"]["solution"] = "7"
    assert dataset[1]["columns"]["solution"] == "6"


def test_a_prompt_with_earlier_replies_trains_none_of_them(tokenizer, tmp_path):
    messages = [
        {"role": "user", "content": "tell me"},
        {"role": "assistant", "content": "the weather"},
        {"role": "user", "content": "and more"},
    ]
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": messages}])
    example = _build(tokenizer, path, "prompt", train_on_prompt=True)[0]

    assert example["input_ids"] == _render(tokenizer, messages, add_generation_prompt=True)
    assert set(example["labels"]) == {-100}


def test_renamed_columns_are_read_under_the_format_names(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"question": "tell me", "answer": "6"}])
    sources = [DataSource(path=str(path), format="prompt", columns={"prompt": "question"})]
    example = build_dataset(sources, DataConfig(train=sources), tokenizer, seed=0)[0]

    assert example["prompt"] == "tell me" and example["columns"] == {"answer": "6", "image_sizes": []}


@pytest.mark.parametrize("fmt", ["preference", "prompt"])
def test_bad_rows_are_named_and_skipped_by_policy(tokenizer, tmp_path, fmt):
    good = PAIR if fmt == "preference" else PROMPT_ONLY
    bad = {"prompt": "q", "chosen": "a"} if fmt == "preference" else {"prompt": "   "}
    path = write_jsonl(tmp_path / "rows.jsonl", [good, bad, "{not json"])

    with pytest.raises(
        DataError, match=r"rows.jsonl row 1 \(line 2\): .*(missing key 'rejected'|'prompt' is empty)"
    ):
        _build(tokenizer, path, fmt)
    dataset = _build(tokenizer, path, fmt, on_bad_row="skip", max_bad_fraction=0.7)
    assert len(dataset) == 1
    kind = "missing_key" if fmt == "preference" else "empty_content"
    assert dataset.stats.skipped_bad == {kind: 1, "unparsable": 1}


def _lengths(tokenizer, pair: dict) -> tuple[int, int]:
    user = {"role": "user", "content": pair["prompt"]}
    return tuple(
        len(_render(tokenizer, [user, {"role": "assistant", "content": pair[k]}]))
        for k in ("chosen", "rejected")
    )


def test_over_length_applies_to_the_longer_sequence_and_truncation_cuts_each_reply(tokenizer, tmp_path):
    pair = {"prompt": "what is two plus two", "chosen": "four", "rejected": "six of course " * 8}
    chosen, rejected = _lengths(tokenizer, pair)
    assert chosen < rejected
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair, PAIR])
    max_length = (chosen + rejected) // 2  # the sum fits nowhere near; only the longer side is over

    with pytest.raises(DataError, match=rf"{rejected} tokens \(the longer sequence of the pair\), more than"):
        _build(tokenizer, path, "preference", max_length=max_length, on_overlength="raise")
    dropped = _build(tokenizer, path, "preference", max_length=max_length, on_overlength="drop")
    assert len(dropped) == 1 and dropped.stats.dropped_overlength == 1
    assert dropped[0] == _build(tokenizer, write_jsonl(tmp_path / "one.jsonl", [PAIR]), "preference")[0]

    cut = _build(tokenizer, path, "preference", max_length=max_length, on_overlength="truncate")
    assert len(cut) == 2 and cut.stats.truncated == 1
    example = cut[0]
    assert len(example["chosen"]["input_ids"]) == chosen  # under the limit: untouched
    assert len(example["rejected"]["input_ids"]) == max_length
    full = _build(tokenizer, path, "preference", max_length=4096)[0]["rejected"]
    assert example["rejected"]["input_ids"] == full["input_ids"][:max_length]
    assert example["rejected"]["labels"] == full["labels"][:max_length]
    assert cut.lengths[0] == chosen + max_length


def test_an_over_length_prompt_row_is_dropped_even_under_truncate(tokenizer, tmp_path):
    path = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": "tell me about the weather " * 10}, PROMPT_ONLY]
    )
    dataset = _build(tokenizer, path, "prompt", max_length=30, on_overlength="truncate")

    assert len(dataset) == 1 and dataset.stats.dropped_overlength == 1 and dataset.stats.truncated == 0
    assert dataset[0]["columns"]["id"] == 7


def test_pairs_and_prompts_come_back_the_same_from_the_cache(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMTUNE_CACHE_DIR", str(tmp_path / "cache"))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [PAIR, {**PAIR, "chosen": "three"}])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [PROMPT_ONLY])

    for path, fmt in ((pairs, "preference"), (prompts, "prompt")):
        built = _build(tokenizer, path, fmt)
        assert any((tmp_path / "cache" / "tokenized").iterdir())
        again = _build(tokenizer, path, fmt)
        assert [again[i] for i in range(len(again))] == [built[i] for i in range(len(built))]
        assert again.lengths == built.lengths
