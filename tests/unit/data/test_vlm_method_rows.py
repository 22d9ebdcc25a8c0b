"""Preference and prompt rows of a vision-language model (tiny Qwen2-VL): the processor's own tokens, images in
both sequences of a pair and never trained, a prompt row's image sizes as the files are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.unit.data.helpers import write_jsonl
from vlmtune.config.schema import DataConfig, DataSource
from vlmtune.data import PairCollator, PromptCollator, build_dataset
from vlmtune.families import get_family
from vlmtune.testing.tiny_vlm import build_tiny_vlm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

PAIR = {
    "prompt": "<image>What colour is it?",
    "chosen": "It is red.",
    "rejected": "Blue.",
    "images": ["red.png"],
}
TEXT_PAIR = {"prompt": "Say hello.", "chosen": "Hello there.", "rejected": "No."}


@pytest.fixture(scope="module")
def qwen(tiny_vlm_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """(family, processor, image folder): tiny Qwen2-VL and a red 100x50 image plus the same image stored as a
    50x100 JPEG whose EXIF says to turn it upright (100x50)."""
    family = get_family("qwen2_vl")
    processor = transformers.AutoProcessor.from_pretrained(
        build_tiny_vlm(family.name, tiny_vlm_root / family.name), local_files_only=True
    )
    images = tmp_path_factory.mktemp("method_images")
    Image.new("RGB", (100, 50), (220, 30, 30)).save(images / "red.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (50, 100), (30, 30, 220)).save(images / "rotated.jpg", exif=exif)
    return family, processor, images


def _build(qwen, rows: list[dict], fmt: str, tmp_path: Path):
    family, processor, images = qwen
    sources = [
        DataSource(path=str(write_jsonl(tmp_path / "rows.jsonl", rows)), format=fmt, image_root=str(images))
    ]
    return build_dataset(sources, DataConfig(train=sources, cache=False), processor, family=family, seed=0)


def _processed(qwen, messages: list[dict], image: str | None, **kwargs) -> dict:
    _, processor, images = qwen
    text = processor.apply_chat_template(messages, tokenize=False, **kwargs)
    opened = [[Image.open(images / image).convert("RGB")]] if image else None
    return processor(text=[text], images=opened, return_tensors="pt")


def test_a_pair_shows_its_image_to_both_sequences_and_trains_the_replies_alone(qwen, tmp_path):
    family, processor, _ = qwen
    dataset = _build(qwen, [PAIR, TEXT_PAIR], "preference", tmp_path)

    example = dataset[0]
    prompt = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}
    ]
    for side in ("chosen", "rejected"):
        got = example[side]
        reply = [{"role": "assistant", "content": [{"type": "text", "text": PAIR[side]}]}]
        want = _processed(qwen, [*prompt, *reply], "red.png")
        assert got["input_ids"] == want["input_ids"][0].tolist()
        assert torch.equal(got["pixel_values"], want["pixel_values"])
        assert torch.equal(got["image_grid_thw"], want["image_grid_thw"])
        trained = [t for t, label in zip(got["input_ids"], got["labels"], strict=True) if label != -100]
        assert processor.tokenizer.decode(trained) == PAIR[side] + "<|im_end|>"
    # The image counts once as an image of the row, twice as the vision tower's work.
    assert dataset.images().tolist() == [1, 0]
    image_ids = set(family.image_token_ids(processor))
    image_tokens = sum(t in image_ids for t in example["chosen"]["input_ids"])
    assert dataset.image_tokens().tolist() == [2 * image_tokens, 0]
    assert dataset.lengths[0] == len(example["chosen"]["input_ids"]) + len(example["rejected"]["input_ids"])
    assert "pixel_values" not in dataset[1]["chosen"]


def test_a_prompt_row_is_the_processors_generation_prompt_with_its_image_sizes(qwen, tmp_path):
    rows = [
        {"prompt": "Where is the shape?", "images": ["rotated.jpg"], "solution": [1, 2, 3, 4]},
        {"prompt": [{"role": "user", "content": "Say hello."}], "solution": "hello"},
    ]
    dataset = _build(qwen, rows, "prompt", tmp_path)

    example = dataset[0]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the shape?"}]}
    ]
    want = _processed(qwen, messages, "rotated.jpg", add_generation_prompt=True)
    assert example["input_ids"] == want["input_ids"][0].tolist()
    assert torch.equal(example["pixel_values"], want["pixel_values"])
    assert set(example["labels"]) == {-100}
    assert example["prompt"] == "Where is the shape?"
    # (width, height) of the upright image: the stored 50x100 turned by its EXIF orientation.
    assert example["columns"] == {"solution": [1, 2, 3, 4], "image_sizes": [(100, 50)]}

    text_only = dataset[1]
    assert text_only["columns"] == {"solution": "hello", "image_sizes": []}
    assert "pixel_values" not in text_only


def test_a_missing_image_is_a_bad_row_named_by_policy(qwen, tmp_path):
    rows = [{**PAIR, "images": ["absent.png"]}, TEXT_PAIR]
    with pytest.raises(Exception, match=r"rows.jsonl row 0.*absent.png"):
        _build(qwen, rows, "preference", tmp_path)


@pytest.mark.parametrize("fmt", ["preference", "prompt"])
def test_an_image_that_fails_to_decode_when_read_is_left_out_and_counted_under_skip(qwen, tmp_path, fmt):
    family, processor, _ = qwen
    folder = tmp_path / "images"
    folder.mkdir()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "noise.png")
    row = (
        {**PAIR, "images": ["noise.png"]}
        if fmt == "preference"
        else {"prompt": "Where?", "images": ["noise.png"]}
    )
    other = TEXT_PAIR if fmt == "preference" else {"prompt": "Say hello."}
    sources = [
        DataSource(
            path=str(write_jsonl(tmp_path / "rows.jsonl", [row, other])), format=fmt, image_root=str(folder)
        )
    ]
    cfg = DataConfig(train=sources, cache=False, on_bad_row="skip")
    dataset = build_dataset(sources, cfg, processor, family=family, seed=0)
    whole = (folder / "noise.png").read_bytes()
    (folder / "noise.png").write_bytes(whole[: len(whole) // 2])  # the header is left: indexed, then cut

    bad = dataset[0]
    assert set(bad) == {"bad_row"} and bad["bad_row"]["kind"] == "bad_image"
    assert "rows.jsonl row 0" in bad["bad_row"]["where"]
    collator = (PairCollator if fmt == "preference" else PromptCollator)(
        processor.tokenizer.pad_token_id, family
    )
    batch = collator([bad, dataset[1]])
    assert batch["bad_rows"].item() == 1
    assert (batch["pairs"].item() == 1) if fmt == "preference" else (len(batch["prompts"]) == 1)
    with pytest.raises(Exception, match=r"rows.jsonl row 0.*noise.png"):
        build_dataset(sources, DataConfig(train=sources, cache=False), processor, family=family, seed=0)[0]
