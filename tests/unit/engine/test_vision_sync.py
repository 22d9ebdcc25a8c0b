"""A text-only forward with `VisionKeepAlive` runs the vision tower and projector, gives trainable projector
weights a (zero) gradient, and leaves the logits exactly as they were."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from vlmtune.data import Collator, Encoder
from vlmtune.data.formats import normalise
from vlmtune.engine.loop import forward
from vlmtune.engine.vision_sync import VisionKeepAlive, generating
from vlmtune.families import FAMILIES, get_family
from vlmtune.model.parts import part_of
from vlmtune.testing.tiny_vlm import build_tiny_vlm

pytestmark = pytest.mark.usefixtures("one_thread")

# Families whose text-only rows skip the vision path altogether: PaliGemma has none, Mllama is refused instead.
SYNCED = [f.name for f in FAMILIES.values() if not (f.needs_images or f.cross_attention_images)]


def tiny_vlm_batch(name: str, root, tmp_path):
    """(family, model, collator, {"image": row, "text": row}) for a tiny model of family `name` (no text row
    for a family that needs images)."""
    family = get_family(name)
    path = build_tiny_vlm(name, root / name)
    processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    model = family.load_class().from_pretrained(path, local_files_only=True)
    Image.new("RGB", (40, 30), (200, 20, 20)).save(tmp_path / "red.png")
    rows = {
        "image": {"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "Red."}],
                  "images": ["red.png"]},
        "text": {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]},
    }  # fmt: skip
    encoded, encoder = {}, Encoder(processor, family)
    for kind, row in rows.items():
        if kind == "text" and family.needs_images:
            continue
        conversation = normalise(row, "messages")
        ids = encoder.encode(conversation, image_root=tmp_path).ids.tolist()
        vision = encoder.vision_inputs(conversation, ids, source="rows", row=0, image_root=tmp_path)
        encoded[kind] = {"input_ids": ids, "labels": ids, **vision}
    return family, model, Collator(processor.tokenizer.pad_token_id, family), encoded


@pytest.mark.parametrize("name", SYNCED)
def test_text_only_forward_runs_the_vision_path(name, tiny_vlm_root, tmp_path):
    family, model, collate, encoded = tiny_vlm_batch(name, tiny_vlm_root, tmp_path)
    image_batch, text_batch = collate([encoded["image"]]), collate([encoded["text"]])
    for n, p in model.named_parameters():
        p.requires_grad_(part_of(n, family) == "projector")
    with torch.no_grad():
        plain = forward(model, text_batch)

    keep = VisionKeepAlive(model, {k: v for k, v in image_batch.items() if k in collate.vision})
    tower_calls = []
    first_vision = dict(model.named_modules())[family.vision[0]]
    first_vision.register_forward_hook(lambda *_: tower_calls.append(1))
    logits = forward(model, text_batch)
    assert tower_calls, "the vision tower did not run on the text-only batch"
    torch.testing.assert_close(logits, plain, rtol=0, atol=0)
    logits.float().sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and not g.any() for g in grads)

    # With images the hook stays out of the way: the tower runs once per forward.
    tower_calls.clear()
    with torch.no_grad():
        forward(model, image_batch)
    keep.remove()
    with torch.no_grad():
        forward(model, image_batch)
    assert len(tower_calls) == 2


@pytest.mark.parametrize("name", SYNCED)
def test_generating_runs_the_same_modules_in_the_same_order_with_or_without_images(
    name, tiny_vlm_root, tmp_path
):
    """Under ZeRO-3 / FSDP2 every module's run is a collective: a process generating for a text-only prompt must
    run the vision tower where one generating for an image prompt does (before or in the prefill), and no
    process runs it in the decoding steps."""
    family, model, collate, encoded = tiny_vlm_batch(name, tiny_vlm_root, tmp_path)
    model.eval()
    image_batch, text_batch = collate([encoded["image"]]), collate([encoded["text"]])
    keep = VisionKeepAlive(model, {k: v for k, v in image_batch.items() if k in collate.vision})
    events = []
    dict(model.named_modules())[family.vision[0]].register_forward_hook(lambda *_: events.append("vision"))
    model.get_input_embeddings().register_forward_hook(lambda *_: events.append("embed"))

    def order(batch: dict, images: bool) -> list[str]:
        events.clear()
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "length", "n_tokens", "bad_rows")}
        with torch.no_grad(), generating(model, images=images):
            model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        return list(events)

    with_image = order(image_batch, True)
    assert with_image.count("vision") >= 1 and with_image[-2:] == ["embed", "embed"]  # decoding: no vision
    assert order(text_batch, False) == with_image
    keep.remove()


def test_installed_when_images_come_only_after_many_text_rows(tiny_vlm_root, tmp_path):
    """Sources are concatenated in order: a long text-only source first must not hide the image rows."""
    from types import SimpleNamespace

    from vlmtune.engine.vision_sync import VisionKeepAlive, keep_vision_in_step

    def installed() -> list[VisionKeepAlive]:
        hooks = model.get_input_embeddings()._forward_hooks.values()
        return [h.__self__ for h in hooks if isinstance(getattr(h, "__self__", None), VisionKeepAlive)]

    family, model, collate, encoded = tiny_vlm_batch("qwen2_vl", tiny_vlm_root, tmp_path)
    accelerator = SimpleNamespace(num_processes=2, device=torch.device("cpu"), unwrap_model=lambda m: m)
    data = _Rows([encoded["text"]] * 1000 + [encoded["image"]])
    keep_vision_in_step(accelerator, model, family, data, collate)
    [keep] = installed()
    assert keep.inputs["pixel_values"].shape == encoded["image"]["pixel_values"].shape
    assert data.read == [1000]  # found from the index: only the row it runs was read (its image decoded)
    keep.remove()
    keep_vision_in_step(accelerator, model, family, _Rows([encoded["text"]] * 4), collate)
    keep_vision_in_step(accelerator, model, family, _Rows([encoded["image"]] * 4), collate)
    assert installed() == []


class _Rows(list):
    """Rows with the index queries of `IndexedDataset`, recording which rows were read."""

    def __init__(self, rows: list[dict]) -> None:
        super().__init__(rows)
        self.read: list[int] = []

    def __getitem__(self, i: int) -> dict:
        self.read.append(i)
        return super().__getitem__(i)

    def images(self) -> np.ndarray:
        return np.array([int("pixel_values" in r) for r in list.__iter__(self)])

    def image_tokens(self) -> np.ndarray:
        return self.images()
