"""The CPU benchmark's fairness evidence: its batch hash must see through padding, and only through padding."""

import importlib.util

from tests.conftest import REPO
from vlmtune.data import Collator
from vlmtune.data.template import tokenize_conversation

# Loaded from its file under its own name: scripts/ is not a package, and `common` is too generic for sys.path.
_spec = importlib.util.spec_from_file_location("bench_common", REPO / "scripts" / "bench" / "common.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
BatchRecorder, alpaca_like_lengths, build_tokenizer, make_rows = (
    bench.BatchRecorder, bench.alpaca_like_lengths, bench.build_tokenizer, bench.make_rows
)  # fmt: skip

EXAMPLES = [
    {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
    {"input_ids": [9, 10], "labels": [-100, 10]},
    {"input_ids": [11, 12, 13], "labels": [-100, 12, 13]},
]


def _digest(collator, batches) -> str:
    recorder = BatchRecorder(collator)
    for batch in batches:
        recorder(batch)
    return recorder.summary()["tokens_sha256"]


def test_padded_and_padding_free_batches_of_the_same_rows_hash_alike():
    from transformers import DataCollatorWithFlattening

    padded = _digest(Collator(pad_token_id=0), [EXAMPLES[:2], EXAMPLES[2:]])
    flat = _digest(DataCollatorWithFlattening(), [EXAMPLES[:2], EXAMPLES[2:]])
    assert padded == flat


def test_order_and_labels_change_the_hash():
    base = _digest(Collator(pad_token_id=0), [EXAMPLES])
    assert _digest(Collator(pad_token_id=0), [EXAMPLES[::-1]]) != base
    relabelled = [dict(EXAMPLES[0], labels=[-100, 6, 7, 8]), *EXAMPLES[1:]]
    assert _digest(Collator(pad_token_id=0), [relabelled]) != base


def test_rows_tokenise_to_their_drawn_lengths_with_the_reply_trained():
    lengths = alpaca_like_lengths(200, seed=1)
    assert min(lengths) >= 16 and max(lengths) <= 512 and 120 <= sorted(lengths)[100] <= 180
    tokenizer = build_tokenizer(1000)
    rows = make_rows(20, vocab_size=1000, seed=1)
    for row, length in zip(rows, alpaca_like_lengths(20, seed=1), strict=True):
        ids, trained = tokenize_conversation(tokenizer, row["messages"])
        assert len(ids) == length
        reply = len(row["messages"][1]["content"].split())
        assert sum(trained) == reply + 1  # the reply and its end-of-turn token
        assert trained[-1] and not any(trained[: len(ids) - reply - 1])


def test_tokenizer_has_exactly_the_asked_vocabulary():
    assert len(build_tokenizer(1000)) == 1000
