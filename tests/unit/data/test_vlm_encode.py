"""Encoding and batching image-text rows for every registered family, on tiny random-init models.

The batch test is the one that proves the batching: the loss of a padded batch that mixes a one-image row, a
two-image row and a text-only row equals the token-weighted mean of the rows' own losses.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.unit.data.helpers import trained_runs
from vlmtune.data.bad_rows import BadRowTracker
from vlmtune.data.dataset import IGNORE_INDEX
from vlmtune.data.vlm_collate import VISION_BATCHING, VLMCollator
from vlmtune.data.vlm_encode import Overlength, encode_vlm_row
from vlmtune.data.vlm_formats import VLMBadRow, normalise_vlm
from vlmtune.errors import DataError
from vlmtune.model.families import FAMILIES, get_family
from vlmtune.testing.tiny_vlm import build_tiny_vlm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two images of different sizes and aspect ratios (different Qwen grids and LLaVA-NeXT tile counts)."""
    root = tmp_path_factory.mktemp("vlm_images")
    sizes = {"red.png": ((100, 50), (220, 30, 30)), "blue.png": ((64, 64), (30, 30, 220))}
    for name, (size, colour) in sizes.items():
        Image.new("RGB", size, colour).save(root / name)
    return {name: root / name for name in sizes}


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request: pytest.FixtureRequest, tiny_vlm_root: Path):
    """(family, processor, model) of one family: built once per session, loaded once per module."""
    family = get_family(request.param)
    path = build_tiny_vlm(family.name, tiny_vlm_root / family.name)
    processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    model = family.load_class().from_pretrained(path, local_files_only=True).eval()
    return family, processor, model


def _rows() -> dict[str, dict]:
    return {
        "one_image": {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "<image>What colour is it?"},
                {"role": "assistant", "content": "It is red."},
            ],
            "images": ["red.png"],
        },
        "two_images": {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": "red.png"},
                        {"type": "image", "image": "blue.png"},
                        {"type": "text", "text": "Compare the two."},
                    ],
                },
                {"role": "assistant", "content": "Red, then blue."},
                {"role": "user", "content": "Which is square?"},
                {"role": "assistant", "content": "The blue one."},
            ]
        },
        "text_only": {
            "messages": [
                {"role": "user", "content": "Say hello."},
                {"role": "assistant", "content": "Hello there."},
            ]
        },
    }


REPLIES = {
    "one_image": ["It is red."],
    "two_images": ["Red, then blue.", "The blue one."],
    "text_only": ["Hello there."],
}


def _encode(tiny, name: str, images: dict[str, Path], **kwargs) -> dict:
    family, processor, _ = tiny
    conv = normalise_vlm(_rows()[name], "messages")
    root = next(iter(images.values())).parent
    kwargs.setdefault("max_length", 1024)
    return encode_vlm_row(processor, family, conv.messages, conv.images, image_root=root, **kwargs)


def _usable(family, name: str) -> bool:
    return not (family.needs_images and name == "text_only")


@pytest.mark.parametrize("name", list(REPLIES))
def test_labels_cover_exactly_the_replies_and_never_an_image_token(tiny, images, name: str) -> None:
    family, processor, _ = tiny
    if not _usable(family, name):
        with pytest.raises(VLMBadRow) as info:
            _encode(tiny, name, images)
        assert info.value.kind == "images_required"
        return
    example = _encode(tiny, name, images)
    ids, labels = example["input_ids"], example["labels"]
    trained = [label != IGNORE_INDEX for label in labels]
    eos = processor.tokenizer.eos_token
    assert trained_runs(processor.tokenizer, ids, trained) == [reply + eos for reply in REPLIES[name]]
    assert all(label in (IGNORE_INDEX, i) for label, i in zip(labels, ids, strict=True))
    assert example["length"] == len(ids) == len(example["attention_mask"])
    image_ids = set(family.image_token_ids(processor))
    n_image_tokens = sum(i in image_ids for i in ids)
    assert (n_image_tokens > 0) == (name != "text_only")

    everything = _encode(tiny, name, images, train_on_prompt=True)
    assert everything["input_ids"] == ids
    assert all(
        (label == IGNORE_INDEX) == (i in image_ids)
        for label, i in zip(everything["labels"], ids, strict=True)
    )
    if family.token_type_ids == "prefix":  # PaliGemma: bidirectional (0) only before the first trained token
        first = trained.index(True)
        assert example["token_type_ids"] == [0] * first + [1] * (len(ids) - first)


def test_a_mixed_batch_gives_the_mean_of_the_rows_losses(tiny, images) -> None:
    family, processor, model = tiny
    examples = [_encode(tiny, name, images) for name in REPLIES if _usable(family, name)]
    collator = VLMCollator(processor.tokenizer.pad_token_id, family)
    batch = collator(examples)
    assert batch["input_ids"].shape == (len(examples), max(e["length"] for e in examples))
    assert set(batch) - {"input_ids", "attention_mask", "labels"} <= {
        *VISION_BATCHING[family.name],
        "token_type_ids",
        "mm_token_type_ids",
    }
    with torch.no_grad():
        loss = model(**batch).loss
        total, tokens = 0.0, 0
        for example in examples:
            single = collator([example])
            n = int((single["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += model(**single).loss.item() * n
            tokens += n
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(total / tokens, abs=1e-4)


def test_a_batch_without_images_has_no_vision_inputs(tiny, images) -> None:
    family, processor, model = tiny
    if family.needs_images:
        pytest.skip(f"{family.name} cannot train on text alone")
    batch = VLMCollator(processor.tokenizer.pad_token_id, family)([_encode(tiny, "text_only", images)] * 2)
    assert not set(batch) & {"pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes"}
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_an_overlength_row_is_never_cut_through_its_images(tiny, images) -> None:
    family, processor, _ = tiny
    full = _encode(tiny, "one_image", images)
    image_ids = set(family.image_token_ids(processor))
    last_image = max(i for i, t in enumerate(full["input_ids"]) if t in image_ids)
    with pytest.raises(Overlength) as info:
        _encode(tiny, "one_image", images, max_length=last_image, truncate=True)
    assert info.value.cuts_images and info.value.length == full["length"]
    with pytest.raises(Overlength) as info:
        _encode(tiny, "one_image", images, max_length=full["length"] - 1)
    assert not info.value.cuts_images
    # Truncation that keeps every image token and some of the reply is allowed, as for text.
    cut = _encode(tiny, "one_image", images, max_length=full["length"] - 1, truncate=True)
    assert cut["input_ids"] == full["input_ids"][:-1] and cut["length"] == full["length"] - 1
    if _usable(family, "text_only"):
        text = _encode(tiny, "text_only", images)
        short = _encode(tiny, "text_only", images, max_length=text["length"] - 2, truncate=True)
        assert short["input_ids"] == text["input_ids"][:-2]


def test_a_missing_image_names_the_file_row_and_image(tiny_vlm_root: Path, tmp_path: Path) -> None:
    family = get_family("qwen2_vl")
    path = build_tiny_vlm(family.name, tiny_vlm_root / family.name)
    processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    conv = normalise_vlm(
        {"messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}]}
        | {"images": ["gone.png"]},
        "messages",
    )
    with pytest.raises(VLMBadRow) as info:
        encode_vlm_row(
            processor,
            family,
            conv.messages,
            conv.images,
            max_length=512,
            source="data/train.jsonl",
            row=7,
            image_root=tmp_path,
        )
    assert info.value.kind == "bad_image"
    assert "image 0" in info.value.problem and "gone.png" in info.value.problem
    assert "data/train.jsonl row 7 image 0" in str(info.value.__cause__)
    with pytest.raises(DataError, match=r"data/train.jsonl row 7: image 0 \(.*gone.png\): file not found"):
        BadRowTracker("raise", 0.0).handle(info.value, "data/train.jsonl row 7")


def test_a_misplaced_mask_is_refused_not_trained(
    tiny_vlm_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without PaliGemma's layout rule (bos after the last image) the spans land 7 characters early: refused."""
    from vlmtune.data import vlm_encode
    from vlmtune.data.template import ChatTemplateError

    family = get_family("paligemma")
    path = build_tiny_vlm(family.name, tiny_vlm_root / family.name)
    processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    conv = normalise_vlm(
        {
            "messages": [
                {"role": "user", "content": "<image>x"},
                {"role": "assistant", "content": "A red square."},
            ]
        }
        | {"images": [Image.new("RGB", (32, 32))]},
        "messages",
    )
    monkeypatch.delitem(vlm_encode._LAYOUT, "paligemma")
    with pytest.raises(ChatTemplateError, match="reads back"):
        encode_vlm_row(processor, family, conv.messages, conv.images, max_length=512)
