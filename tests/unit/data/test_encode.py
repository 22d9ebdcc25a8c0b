"""Encoding and batching image-text rows for every registered family, on tiny random-init models, through the
one pipeline: indexed from image headers (no pixel decoded), images decoded when a row is read.

The batch test is the one that proves the batching: the loss of a padded batch that mixes a one-image row, a
two-image row and a text-only row equals the token-weighted mean of the rows' own losses. Reading each row also
checks that the processor's real tokens equal the indexed ones.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image

from tests.unit.data.helpers import trained_runs
from vlmtune.config.schema import DataConfig, DataSource
from vlmtune.data import IGNORE_INDEX, Collator, Encoder, build_dataset
from vlmtune.data import images as images_module
from vlmtune.data.bad_rows import BadRow
from vlmtune.data.formats import normalise
from vlmtune.data.template import ChatTemplateError
from vlmtune.errors import DataError
from vlmtune.model.families import FAMILIES, get_family
from vlmtune.testing.tiny_vlm import build_tiny_vlm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two images of different sizes and aspect ratios (different Qwen grids and LLaVA-NeXT tile counts)."""
    root = tmp_path_factory.mktemp("vlm_images")
    for name, size, colour in (("red.png", (100, 50), (220, 30, 30)), ("blue.png", (64, 64), (30, 30, 220))):
        Image.new("RGB", size, colour).save(root / name)
    return root


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request: pytest.FixtureRequest, tiny_vlm_root: Path):
    """(family, processor, model) of one family: built once per session, loaded once per module."""
    family = get_family(request.param)
    path = build_tiny_vlm(family.name, tiny_vlm_root / family.name)
    processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    model = family.load_class().from_pretrained(path, local_files_only=True).eval()
    return family, processor, model


ROWS = {
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


def _usable(family, name: str) -> bool:
    return not (family.needs_images and name == "text_only")


def _dataset(tiny, image_dir: Path, names: list[str], tmp_path: Path, problems=None, **policies):
    family, processor, _ = tiny
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(ROWS[n]) + "\n" for n in names))
    cfg = DataConfig(train=[DataSource(path=str(path), image_root=str(image_dir))], cache=False, **policies)
    return build_dataset(cfg.train, cfg, processor, family=family, seed=0, problems=problems)


@pytest.mark.parametrize("name", list(REPLIES))
def test_labels_cover_exactly_the_replies_and_never_an_image_token(tiny, image_dir, name: str) -> None:
    family, processor, _ = tiny
    conversation = normalise(ROWS[name], "messages")
    encoder = Encoder(processor, family)
    if not _usable(family, name):
        with pytest.raises(BadRow) as info:
            encoder.encode(conversation, image_root=image_dir)
        assert info.value.kind == "images_required"
        return
    row = encoder.encode(conversation, image_root=image_dir)
    ids, trained = row.ids.tolist(), row.trained.tolist()
    eos = processor.tokenizer.eos_token
    assert trained_runs(processor.tokenizer, ids, trained) == [reply + eos for reply in REPLIES[name]]
    image_ids = set(family.image_token_ids(processor))
    assert row.image_tokens == sum(i in image_ids for i in ids)
    assert (row.image_tokens > 0) == (name != "text_only") and row.images == len(conversation.images)

    everything = Encoder(processor, family, train_on_prompt=True).encode(conversation, image_root=image_dir)
    assert everything.ids.tolist() == ids
    assert everything.trained.tolist() == [i not in image_ids for i in ids]


def test_indexing_decodes_no_image_and_reading_gives_the_processors_tokens(
    tiny, image_dir, tmp_path, monkeypatch
) -> None:
    """The index comes from image headers alone; reading a row decodes its images and runs the processor, whose
    tokens must equal the indexed ones (checked inside `__getitem__`), and whose outputs are batched."""
    family, processor, model = tiny
    names = [n for n in REPLIES if _usable(family, n)]

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded while indexing")

    with monkeypatch.context() as patch:
        patch.setattr(images_module.Image.Image, "load", no_decoding)
        data = _dataset(tiny, image_dir, names, tmp_path)
    examples = [data[i] for i in range(len(data))]
    for name, example in zip(names, examples, strict=True):
        ids = example["input_ids"]
        out = _processor_ids(processor, family, ROWS[name], image_dir)
        assert ids == out, name
        assert data.lengths[names.index(name)] == len(ids)
    if family.token_type_ids == "prefix":  # PaliGemma: bidirectional (0) only before the first trained token
        for example in examples:
            first = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
            assert example["token_type_ids"] == [0] * first + [1] * (len(example["input_ids"]) - first)

    collator = Collator(processor.tokenizer.pad_token_id, family)
    batch = collator(examples)
    assert batch["input_ids"].shape == (len(examples), max(len(e["input_ids"]) for e in examples))
    assert set(batch) - {"input_ids", "attention_mask", "labels"} <= {
        *family.vision_batching,
        *family.token_pad,
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


def _processor_ids(processor, family, raw: dict, image_dir: Path) -> list[int]:
    """What the processor itself gives for a row, with decoded images: the reference the index must equal."""
    from vlmtune.data.encode import _render_messages
    from vlmtune.data.template import render

    conversation = normalise(raw, "messages")
    images = [Image.open(image_dir / p).convert("RGB") for p in conversation.images]
    text = render(processor, _render_messages(conversation))
    out = processor(text=[text], images=[images] if images else None, add_special_tokens=False)
    return list(out["input_ids"][0])


def test_a_batch_without_images_has_no_vision_inputs(tiny, image_dir, tmp_path) -> None:
    family, processor, model = tiny
    if family.needs_images:
        pytest.skip(f"{family.name} cannot train on text alone")
    data = _dataset(tiny, image_dir, ["text_only", "text_only"], tmp_path)
    batch = Collator(processor.tokenizer.pad_token_id, family)([data[0], data[1]])
    assert not set(batch) & {"pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes"}
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_an_overlength_row_is_never_cut_through_its_images(tiny, image_dir, tmp_path) -> None:
    family, processor, _ = tiny
    full = Encoder(processor, family).encode(normalise(ROWS["one_image"], "messages"), image_root=image_dir)
    length, last_image = len(full.ids), full.last_image
    problems: list[dict] = []
    with pytest.raises(DataError, match="no usable examples"):
        _dataset(
            tiny,
            image_dir,
            ["one_image"],
            tmp_path,
            problems,
            max_length=last_image,
            on_overlength="truncate",
        )
    assert problems[0]["kind"] == "overlength" and "cut through its image tokens" in problems[0]["problem"]
    with pytest.raises(DataError, match=r"more than data\.max_length"):
        _dataset(tiny, image_dir, ["one_image"], tmp_path, max_length=length - 1, on_overlength="raise")
    # Truncation that keeps every image token and some of the reply is allowed, as for text.
    cut = _dataset(tiny, image_dir, ["one_image"], tmp_path, max_length=length - 1, on_overlength="truncate")
    assert cut[0]["input_ids"] == full.ids.tolist()[:-1] and cut.stats.truncated == 1


def test_a_missing_image_fails_at_indexing_naming_the_file_row_and_image(tiny_vlm_root, tmp_path) -> None:
    family = get_family("qwen2_vl")
    processor = transformers.AutoProcessor.from_pretrained(
        build_tiny_vlm(family.name, tiny_vlm_root / family.name)
    )
    row = {"messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}]}
    with pytest.raises(BadRow) as info:
        Encoder(processor, family).encode(
            normalise(row | {"images": ["gone.png"]}, "messages"), source="data/train.jsonl", row=7,
            image_root=tmp_path,
        )  # fmt: skip
    assert info.value.kind == "bad_image"
    assert "image 0" in info.value.problem and "gone.png" in info.value.problem
    assert "data/train.jsonl row 7 image 0" in str(info.value.__cause__)


def test_a_broken_or_changed_image_is_found_when_its_row_is_read(tiny_vlm_root, tmp_path) -> None:
    """A file that decodes badly fails when read (raise) or is left out and counted (skip); a file resized since
    it was indexed would misalign tokens and images: always an error."""
    family = get_family("qwen2_vl")
    processor = transformers.AutoProcessor.from_pretrained(
        build_tiny_vlm(family.name, tiny_vlm_root / family.name)
    )
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / name)
    good = {"messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}]}
    path = tmp_path / "rows.jsonl"
    path.write_text(
        json.dumps(good | {"images": ["a.jpg"]}) + "\n" + json.dumps(good | {"images": ["b.jpg"]}) + "\n"
    )

    def build(on_bad_row: str):
        cfg = DataConfig(train=[DataSource(path=str(path))], cache=False, on_bad_row=on_bad_row)
        return build_dataset(cfg.train, cfg, processor, family=family, seed=0)

    raising, skipping = build("raise"), build("skip")
    whole = (tmp_path / "b.jpg").read_bytes()
    (tmp_path / "b.jpg").write_bytes(whole[: len(whole) // 2])  # the header survives: indexing passes
    with pytest.raises(
        DataError, match=r"rows.jsonl row 1 \(line 2\): image 0 .*b.jpg.*: cannot (read|decode) the image"
    ):
        raising[1]
    assert skipping[1]["bad_row"]["kind"] == "bad_image"
    batch = Collator(processor.tokenizer.pad_token_id, family)([skipping[0], skipping[1]])
    assert batch["input_ids"].shape[0] == 1 and int(batch["bad_rows"]) == 1
    assert batch["input_ids"][0].tolist() == skipping[0]["input_ids"]

    Image.new("RGB", (640, 480), (200, 10, 10)).save(tmp_path / "a.jpg")  # more image tokens than indexed
    with pytest.raises(DataError, match=r"row 0: the processor gives .* tokens for this row now"):
        skipping[0]


def test_a_misplaced_mask_is_refused_not_trained(tiny_vlm_root: Path) -> None:
    """Without PaliGemma's layout rule (bos after the last image) the spans land early: refused."""
    family = get_family("paligemma")
    processor = transformers.AutoProcessor.from_pretrained(
        build_tiny_vlm(family.name, tiny_vlm_root / family.name)
    )
    row = {
        "messages": [
            {"role": "user", "content": "<image>x"},
            {"role": "assistant", "content": "A red square."},
        ],
        "images": [Image.new("RGB", (32, 32))],
    }
    unaware = dataclasses.replace(family, text_layout=None)
    with pytest.raises(ChatTemplateError, match="reads back"):
        Encoder(processor, unaware).encode(normalise(row, "messages"))
