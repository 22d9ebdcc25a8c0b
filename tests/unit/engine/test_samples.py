import json

import torch

from vlmtune.data.encode import IGNORE_INDEX
from vlmtune.engine.samples import SampleWriter, cut_before_last_answer

X = IGNORE_INDEX


def test_the_prompt_ends_where_the_last_answer_starts():
    example = {
        "input_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9],
        "labels": [X, X, 3, 4, X, X, 7, 8, X],  # two answers; the last is tokens 6..7
        "mm_token_type_ids": [0, 1, 1, 0, 0, 0, 0, 0, 0],
        "pixel_values": torch.ones(4, 3),
    }
    row, start, end = cut_before_last_answer(example, {"input_ids", "labels", "mm_token_type_ids"})
    assert (start, end) == (6, 8)
    assert row["input_ids"] == [1, 2, 3, 4, 5, 6] and row["labels"] == [X, X, 3, 4, X, X]
    assert row["mm_token_type_ids"] == [0, 1, 1, 0, 0, 0]
    assert row["pixel_values"] is example["pixel_values"]  # vision inputs go with the prompt whole


def test_rows_with_nothing_to_answer_are_passed_over():
    assert cut_before_last_answer({"input_ids": [1, 2], "labels": [X, X]}, {"input_ids", "labels"}) is None
    assert cut_before_last_answer({"bad_row": {"where": "a.jsonl:3"}}, set()) is None


class _Main:
    is_main_process = True


def test_rewind_forgets_samples_after_the_resumed_step(tmp_path):
    path = tmp_path / "samples.jsonl"
    lines = [json.dumps({"step": s, "completion": "x"}) for s in (2, 4, 6)] + ['{"step": 8, "comp']
    path.write_text("\n".join(lines) + "\n")
    writer = SampleWriter(_Main(), [], None, None, path, count=2, max_new_tokens=4)
    writer.rewind(4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]
