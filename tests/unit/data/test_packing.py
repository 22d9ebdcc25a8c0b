"""Packing and padding-free batches give the padded batch's loss, token for token, on a real tiny model."""

from __future__ import annotations

import pytest
import torch

from vlmtune.data import Collator
from vlmtune.data.packing import (
    OneRowPackedCollator,
    PackedCollator,
    PaddingFreeCollator,
    best_fit_decreasing,
    budget_chunks,
    check_packed_attention,
)
from vlmtune.engine.loop import token_loss_sum, trained_tokens
from vlmtune.errors import UserError

PAD = 0


def _examples(lengths: list[int], seed: int = 0, vocab: int = 300) -> list[dict]:
    """Rows with a 2-token untrained prompt and every later token trained (labels aligned with inputs)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100, -100, *ids[2:]]})
    return out


@pytest.fixture(scope="module")
def models(tiny_model_dir, one_thread):
    from transformers import AutoModelForCausalLM

    out = {}
    for impl in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, dtype=torch.float32, attn_implementation=impl
        )
        model.config.use_cache = False
        out[impl] = model.eval()
    return out


@torch.no_grad()
def _loss(model, batch: dict) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "n_tokens")}
    return token_loss_sum(model(**inputs).logits, batch["labels"])


def test_best_fit_decreasing_places_every_row_once_within_capacity():
    assert best_fit_decreasing([6, 5, 4, 3, 2], 10, seed=0) == [[0, 2], [1, 3, 4]]
    lengths = torch.randint(1, 60, (500,), generator=torch.Generator().manual_seed(0)).tolist()
    bins = best_fit_decreasing(lengths, 64, seed=1)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= -(-sum(lengths) // 64) * 1.1  # within 10% of the lower bound
    assert best_fit_decreasing(lengths, 64, seed=1) == bins  # a pure function of the seed
    assert len(best_fit_decreasing(lengths, 64, seed=2)) == len(bins)  # the count does not depend on it
    with pytest.raises(ValueError, match="does not fit"):
        best_fit_decreasing([65], 64, seed=0)


def test_budget_chunks_bound_rows_times_longest():
    lengths = torch.randint(1, 60, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    chunks = budget_chunks(lengths, 200, seed=0)
    assert sorted(i for c in chunks for i in c) == list(range(300))
    assert all(len(c) * max(lengths[i] for i in c) <= 200 for c in chunks)


def test_padding_free_batch_has_no_padding_and_restarts_positions():
    batch = PaddingFreeCollator()(_examples([5, 3]))
    assert (
        "attention_mask" not in batch and batch["input_ids"].shape == (1, 8) and int(batch["n_tokens"]) == 8
    )
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    # The first token of each sequence is never a target, so nothing is predicted across the boundary.
    assert batch["labels"][0, 0] == -100 and batch["labels"][0, 5] == -100


def test_rows_whose_images_failed_to_decode_are_left_out_and_counted():
    """data.on_bad_row: skip hands a row whose image failed as {"bad_row": ...}; packed batches drop it like padded
    ones, and a bin left empty still runs one token that trains nothing."""
    a, b = _examples([5, 3])
    bad = {"bad_row": "broken.png: truncated"}
    batch = PaddingFreeCollator(0)([a, bad, b])
    assert batch["input_ids"].shape == (1, 8) and int(batch["bad_rows"]) == 1
    packed = PackedCollator(0)([[a, bad], [bad]])
    assert packed["input_ids"].shape == (2, 5) and int(packed["bad_rows"]) == 2
    assert (packed["labels"][1] == -100).all() and int(packed["n_tokens"]) == 6


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_padding_free_loss_equals_the_padded_loss(models, impl):
    model = models[impl]
    examples = _examples([9, 23, 5, 16])
    padded, free = Collator(PAD)(examples), PaddingFreeCollator()(examples)
    assert trained_tokens(free["labels"]) == trained_tokens(padded["labels"])
    torch.testing.assert_close(_loss(model, free), _loss(model, padded), rtol=1e-5, atol=1e-4)


def test_first_token_of_a_packed_sequence_is_never_a_target(models):
    """With every label set (train_on_prompt), a naive concatenation trains B's first token from A's last."""
    model = models["sdpa"]
    examples = [{"input_ids": e["input_ids"], "labels": list(e["input_ids"])} for e in _examples([7, 12, 4])]
    free = PaddingFreeCollator()(examples)
    separate = sum(_loss(model, Collator(PAD)([e])) for e in examples)
    torch.testing.assert_close(_loss(model, free), separate, rtol=1e-5, atol=1e-4)
    naive = dict(free, labels=torch.tensor([[t for e in examples for t in e["labels"]]]))
    assert _loss(model, naive) > separate + 1.0  # the boundary targets the test guards against


def test_packed_bins_give_the_same_token_weighted_loss_as_padded_rows(models):
    model = models["sdpa"]
    lengths = [30, 12, 25, 7, 18, 3, 22, 9]
    examples = _examples(lengths, seed=3)
    bins = best_fit_decreasing(lengths, 40, seed=0)
    assert len(bins) < len(examples)  # really packed
    packed = PackedCollator(PAD)([[examples[i] for i in b] for b in bins])
    assert "attention_mask" not in packed and packed["input_ids"].shape[1] <= 40
    padded = Collator(PAD)(examples)
    assert trained_tokens(packed["labels"]) == trained_tokens(padded["labels"])
    assert int(packed["n_tokens"]) == sum(lengths)
    torch.testing.assert_close(_loss(model, packed), _loss(model, padded), rtol=1e-5, atol=1e-4)
    # The same rows in another grouping (two micro-batches of other bins) sum to the same loss.
    regrouped = best_fit_decreasing(lengths, 64, seed=5)
    total = sum(_loss(model, PackedCollator(PAD)([[examples[i] for i in b]])) for b in regrouped)
    torch.testing.assert_close(total, _loss(model, padded), rtol=1e-5, atol=1e-4)


class _IgnoresPositions(torch.nn.Module):
    """A model whose attention knows nothing of packed sequences: it drops `position_ids`."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, position_ids=None, **kwargs):
        return self.inner(input_ids=input_ids, **kwargs)


def test_a_model_that_mixes_packed_sequences_is_refused(models):
    for model in models.values():  # the tiny Llama keeps them apart, in one row and in several
        check_packed_attention(model, PaddingFreeCollator(), 300, "cpu", "padding_free")
        check_packed_attention(model, PackedCollator(PAD), 300, "cpu", "packed")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 rounding is not mistaken for mixing
        check_packed_attention(models["sdpa"], PackedCollator(PAD), 300, "cpu", "packed")
    broken = _IgnoresPositions(models["sdpa"])
    for collator, batching in ((PaddingFreeCollator(), "padding_free"), (PackedCollator(PAD), "packed")):
        with pytest.raises(UserError, match=r"attend to each other.*data\.batching: padded"):
            check_packed_attention(broken, collator, 300, "cpu", batching)


def test_flash_attention_gets_packed_bins_in_one_row():
    """transformers' flash-attention path reads packed boundaries only from a one-row batch."""
    bins = [_examples([5, 3]), _examples([4], seed=1)]
    batch = OneRowPackedCollator()(bins)
    assert batch["input_ids"].shape == (1, 12) and batch["position_ids"].tolist() == [
        [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]
    ]
    assert torch.equal(batch["labels"], PaddingFreeCollator()([e for b in bins for e in b])["labels"])
