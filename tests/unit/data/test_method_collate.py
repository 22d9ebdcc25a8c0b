"""DPO and GRPO batches: a micro-batch of pairs is one batch of chosen then rejected rows; prompts are left-padded
so that generating from the batch continues each prompt as it would alone (text and tiny Qwen2-VL)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.unit.data.helpers import write_jsonl
from vlmtune.config.schema import DataConfig, DataSource, Recipe
from vlmtune.data import Collator, PairCollator, PromptCollator, build_dataset
from vlmtune.data.batching import build_collator, method_collator
from vlmtune.families import get_family
from vlmtune.testing.tiny_vlm import build_tiny_vlm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PAD = 9
BAD = {"bad_row": {"where": "a.jsonl row 3", "kind": "bad_image", "problem": "missing"}}


def _pair(chosen: list[int], rejected: list[int]) -> dict:
    return {
        "chosen": {"input_ids": chosen, "labels": [-100, *chosen[1:]]},
        "rejected": {"input_ids": rejected, "labels": [-100, *rejected[1:]]},
    }


def test_pairs_are_one_batch_of_the_chosen_rows_then_the_rejected_rows():
    batch = PairCollator(PAD)([_pair([1, 2], [1, 3, 4]), BAD, _pair([5, 6, 7, 8], [5])])

    assert batch["input_ids"].tolist() == [[1, 2, PAD, PAD], [5, 6, 7, 8], [1, 3, 4, PAD], [5, PAD, PAD, PAD]]
    assert batch["attention_mask"].sum(1).tolist() == [2, 4, 3, 1]
    assert batch["labels"].tolist() == [
        [-100, 2, -100, -100],
        [-100, 6, 7, 8],
        [-100, 3, 4, -100],
        [-100, -100, -100, -100],
    ]
    assert batch["pairs"].item() == 2 and batch["bad_rows"].item() == 1

    empty = PairCollator(PAD)([BAD])
    assert empty["pairs"].item() == 0 and empty["input_ids"].tolist() == [[PAD], [PAD]]
    assert (empty["labels"] == -100).all()
    with pytest.raises(ValueError, match="not a preference pair"):
        PairCollator(PAD)([{"input_ids": [1], "labels": [1]}])


def _prompt(ids: list[int], prompt: str, **columns) -> dict:
    return {"input_ids": ids, "labels": [-100] * len(ids), "prompt": prompt, "columns": columns}


def test_prompts_are_left_padded_with_their_prompts_and_columns():
    examples = [_prompt([1, 2, 3], "a", solution="3"), BAD, _prompt([4], "b", solution="4", id=2)]
    batch = PromptCollator(PAD, pad_to_multiple_of=4)(examples)

    assert batch["input_ids"].tolist() == [[PAD, 1, 2, 3], [PAD, PAD, PAD, 4]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert (batch["labels"] == -100).all()
    assert batch["prompts"] == ["a", "b"]
    assert batch["columns"] == {"solution": ["3", "4"], "id": [None, 2]}
    assert batch["bad_rows"].item() == 1

    empty = PromptCollator(PAD)([BAD])
    assert empty["prompts"] == [] and empty["columns"] == {} and empty["input_ids"].tolist() == [[PAD]]
    with pytest.raises(ValueError, match="has no 'prompt'"):
        PromptCollator(PAD)([{"input_ids": [1], "labels": [1]}])


def test_the_method_picks_the_collator_and_packing_is_refused():
    base = {"model": {"path": "m"}, "data": {"train": [{"path": "d.jsonl"}]}, "train": {"output_dir": "out"}}
    expected = {"sft": Collator, "dpo": PairCollator, "grpo": PromptCollator}
    for method, kind in expected.items():
        extra = {"grpo": {"rewards": [{"name": "format"}]}} if method == "grpo" else {}
        recipe = Recipe.model_validate({**base, **extra, "method": method})
        collator = method_collator(recipe, PAD)
        assert type(collator) is kind
        assert build_collator(recipe, collator, PAD) is collator
    packed = Recipe.model_validate({**base, "method": "dpo", "data": {**base["data"], "batching": "packed"}})
    with pytest.raises(ValueError, match="padded rows only"):
        build_collator(packed, PairCollator(PAD), PAD)


def _greedy(model, batch: dict, pad: int) -> list[list[int]]:
    """Four greedy tokens per row of `batch`."""
    inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "labels"}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=pad)
    return out[:, batch["input_ids"].shape[1] :].tolist()


def test_generating_from_a_left_padded_text_batch_continues_each_prompt_as_alone(tiny_model_dir, tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rows = [{"prompt": "Hello"}, {"prompt": "Tell me a much longer story about the weather today, please."}]
    sources = [DataSource(path=str(write_jsonl(tmp_path / "p.jsonl", rows)), format="prompt")]
    data = build_dataset(sources, DataConfig(train=sources), tokenizer, seed=0)
    pad = tokenizer.pad_token_id
    collator = PromptCollator(pad)

    batch = collator([data[0], data[1]])
    assert batch["input_ids"].shape[1] > len(data[0]["input_ids"])  # the short prompt is padded
    together = _greedy(model, batch, pad)
    alone = [_greedy(model, collator([data[i]]), pad)[0] for i in range(2)]
    assert together == alone


@pytest.fixture(scope="module")
def qwen(tiny_vlm_root: Path, tmp_path_factory: pytest.TempPathFactory):
    family = get_family("qwen2_vl")
    path = build_tiny_vlm(family.name, tiny_vlm_root / family.name)
    processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    model = family.load_class().from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    images = tmp_path_factory.mktemp("collate_images")
    Image.new("RGB", (100, 50), (220, 30, 30)).save(images / "red.png")
    Image.new("RGB", (64, 64), (30, 30, 220)).save(images / "blue.png")
    return family, processor, model, images


def _vlm_data(qwen, rows: list[dict], fmt: str, tmp_path: Path):
    family, processor, _, images = qwen
    path = write_jsonl(tmp_path / f"{fmt}.jsonl", rows)
    sources = [DataSource(path=str(path), format=fmt, image_root=str(images))]
    return build_dataset(sources, DataConfig(train=sources, cache=False), processor, family=family, seed=0)


@pytest.mark.usefixtures("one_thread")
def test_a_pair_batch_gives_every_row_the_logits_it_gets_alone(qwen, tmp_path):
    family, processor, model, _ = qwen
    rows = [
        {
            "prompt": "<image>What colour?",
            "chosen": "Red.",
            "rejected": "It is blue, I think.",
            "images": ["red.png"],
        },
        {"prompt": "Say hi.", "chosen": "Hi there.", "rejected": "No."},
        {"prompt": "<image>And this?", "chosen": "Blue.", "rejected": "Red.", "images": ["blue.png"]},
    ]
    data = _vlm_data(qwen, rows, "preference", tmp_path)
    pad = processor.tokenizer.pad_token_id
    batch = PairCollator(pad, family)([data[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 6 and batch["pairs"].item() == 3
    assert batch["image_grid_thw"].shape[0] == 4  # each image twice: for its chosen and its rejected row

    inputs = {k: v for k, v in batch.items() if k != "pairs"}
    alone = Collator(pad, family)
    with torch.no_grad():
        logits = model(**inputs).logits
        for row, (i, side) in enumerate([(i, s) for s in ("chosen", "rejected") for i in range(3)]):
            example = data[i][side]
            ref = model(**alone([example])).logits[0]
            n = len(example["input_ids"])
            assert torch.allclose(logits[row, :n], ref, atol=1e-4, rtol=1e-4), (i, side)


@pytest.mark.usefixtures("one_thread")
def test_generating_from_a_left_padded_image_batch_continues_each_prompt_as_alone(qwen, tmp_path):
    family, processor, model, _ = qwen
    rows = [
        {"prompt": "Where is the shape?", "images": ["red.png"], "solution": [0, 0, 10, 10]},
        {"prompt": "Say hello to everyone in the room, please, and then stop.", "solution": "hello"},
        {"prompt": "<image>Which colour?", "images": ["blue.png"], "solution": "blue"},
    ]
    data = _vlm_data(qwen, rows, "prompt", tmp_path)
    pad = processor.tokenizer.pad_token_id
    collator = PromptCollator(pad, family)

    batch = collator([data[i] for i in range(3)])
    assert batch["columns"]["image_sizes"] == [[(100, 50)], [], [(64, 64)]]
    together = _greedy(model, batch, pad)
    alone = [_greedy(model, collator([data[i]]), pad)[0] for i in range(3)]
    assert together == alone
