"""Padding-free and packed image-text batches, for every family that allows them, on tiny random-init models.

The proof: every example of a packed batch (two bins, one mixing an image row and a text-only row) gets, token
for token, the logits and loss it gets alone in a padded batch of one; and the LoRA gradients of the packed batch
equal those of the same examples padded. Wrong positions (not restarting per example, or 1-D positions for
Qwen-VL's 3-D rope) or attention across examples change the logits by far more than rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vlmtune.config.schema import DataConfig, DataSource
from vlmtune.data import IGNORE_INDEX, Collator, build_dataset
from vlmtune.data.packing import PackedCollator, PaddingFreeCollator, check_packed_attention
from vlmtune.data.positions import RopeIndex
from vlmtune.engine.loop import forward, token_loss_sum
from vlmtune.families import FAMILIES, get_family
from vlmtune.testing.tiny_vlm import build_tiny_vlm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

PACKABLE = [name for name, f in FAMILIES.items() if not f.packing_refused]

ROWS = [
    {
        "messages": [
            {"role": "user", "content": "<image>What colour is it?"},
            {"role": "assistant", "content": "It is red."},
        ],
        "images": ["red.png"],
    },
    {
        "messages": [
            {"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": "Hello there, friend."},
        ]
    },
    {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "wide.png"},
                    {"type": "image", "image": "blue.png"},
                    {"type": "text", "text": "Compare the two."},
                ],
            },
            {"role": "assistant", "content": "Wide, then square."},
        ]
    },
]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images of different sizes: different Qwen grids (so different 3-D positions) and LLaVA-NeXT tiles."""
    root = tmp_path_factory.mktemp("pack_images")
    for name, size, colour in (
        ("red.png", (100, 50), (220, 30, 30)),
        ("wide.png", (120, 40), (30, 200, 30)),
        ("blue.png", (64, 64), (30, 30, 220)),
    ):
        Image.new("RGB", size, colour).save(root / name)
    return root


@pytest.fixture(scope="module", params=PACKABLE)
def tiny(request: pytest.FixtureRequest, tiny_vlm_root: Path, image_dir: Path, tmp_path_factory):
    """(family, processor, model, examples) of one family, loaded once per module."""
    family = get_family(request.param)
    path = build_tiny_vlm(family.name, tiny_vlm_root / family.name)
    processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    model = family.load_class().from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    for config in (model.config, model.config.text_config):  # as `model.load.load_model` leaves it
        config.use_cache = False
    rows = [r for r in ROWS if not (family.needs_images and r is ROWS[1])]
    jsonl = tmp_path_factory.mktemp("pack_rows") / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(train=[DataSource(path=str(jsonl), image_root=str(image_dir))], cache=False)
    data = build_dataset(cfg.train, cfg, processor, family=family, seed=0)
    examples = [data[i] for i in range(len(data))]
    return family, processor, model, examples


def _collators(family, processor, model):
    pad = processor.tokenizer.pad_token_id
    padded = Collator(pad, family)
    rope = RopeIndex(family.rope_index, model.config) if family.rope_index else None
    return padded, PaddingFreeCollator(pad, padded, rope), PackedCollator(pad, padded, rope)


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss of predicting the next label (0 where it is not trained)."""
    shifted = torch.nn.functional.pad(labels[1:], (0, 1), value=IGNORE_INDEX)
    return torch.nn.functional.cross_entropy(
        logits.float(), shifted, ignore_index=IGNORE_INDEX, reduction="none"
    )


def _spans(rows: list[list[dict]]) -> list[tuple[int, int, int]]:
    """(row, start, end) of each example of packed `rows` (padding after the last one is not an example)."""
    out = []
    for r, row in enumerate(rows):
        start = 0
        for example in row:
            out.append((r, start, start + len(example["input_ids"])))
            start += len(example["input_ids"])
    return out


def _assert_each_example_as_alone(model, padded, batch: dict, rows: list[list[dict]]) -> None:
    with torch.no_grad():
        logits = forward(model, batch)
        for (r, a, b), example in zip(_spans(rows), [e for row in rows for e in row], strict=True):
            ref = forward(model, padded([example]))[0]
            got = logits[r, a:b]
            scale = ref.abs().max()
            bad = ((got - ref).abs().amax(-1) > 1e-4 * scale).nonzero().flatten().tolist()
            assert not bad, f"example at row {r} [{a}:{b}]: tokens {bad} differ"
            labels = torch.as_tensor(example["labels"])
            assert torch.allclose(
                _token_losses(got, labels), _token_losses(ref, labels), rtol=1e-4, atol=1e-5
            )


def test_every_packed_example_gets_the_logits_and_loss_it_gets_alone(tiny) -> None:
    family, processor, model, examples = tiny
    padded, padding_free, packed = _collators(family, processor, model)
    # Bins: [image row, text row] (or two image rows) and [the two-image row]: images of different rows in one
    # row, and a pack that mixes text-only and image rows.
    bins = [examples[:2], examples[2:]]
    batch = packed(bins)
    assert "attention_mask" not in batch
    if family.rope_index:
        assert batch["position_ids"].shape[:2] == (4, 2)
    _assert_each_example_as_alone(model, padded, batch, bins)
    _assert_each_example_as_alone(model, padded, padding_free(examples), [examples])


def test_packed_lora_gradients_equal_the_padded_ones(tiny) -> None:
    from peft import LoraConfig, get_peft_model

    from vlmtune.model.parts import lm_lora_targets

    family, processor, model, examples = tiny
    padded, _, packed = _collators(family, processor, model)
    peft_model = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8, target_modules=lm_lora_targets(model, family), init_lora_weights=False),
    )
    try:
        peft_model.train()
        grads = []
        for batch in (padded(examples), packed([examples[:2], examples[2:]])):
            peft_model.zero_grad()
            loss = token_loss_sum(forward(peft_model, batch), batch["labels"])
            loss.backward()
            grads.append({n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad})
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for name, ref in grads[0].items():
            assert torch.allclose(grads[1][name], ref, rtol=1e-3, atol=1e-5 * ref.abs().max()), name
    finally:
        peft_model.unload()
        model.eval()


def test_the_attention_check_passes_for_packable_families(tiny) -> None:
    family, processor, model, _ = tiny
    _, padding_free, packed = _collators(family, processor, model)
    vocab = len(processor.tokenizer)
    check_packed_attention(model, padding_free, vocab, "cpu", "padding_free")
    check_packed_attention(model, packed, vocab, "cpu", "packed")


def test_rope_positions_are_the_models_own_for_each_example(tiny) -> None:
    family, processor, model, examples = tiny
    if not family.rope_index:
        pytest.skip("1-D positions")
    _, padding_free, _ = _collators(family, processor, model)
    batch = padding_free(examples)
    start = 0
    for example in examples:
        alone = Collator(processor.tokenizer.pad_token_id, family)([example])
        ref, _ = (
            model.model.get_rope_index(
                alone["input_ids"],
                mm_token_type_ids=alone["mm_token_type_ids"],
                image_grid_thw=alone.get("image_grid_thw"),
            )
            if "image_grid_thw" in alone
            else (torch.arange(alone["input_ids"].shape[1]).expand(3, 1, -1), None)
        )
        n = len(example["input_ids"])
        assert torch.equal(batch["position_ids"][1:, 0, start : start + n], ref[:, 0])
        assert torch.equal(batch["position_ids"][0, 0, start : start + n], torch.arange(n))
        start += n


def test_rope_index_survives_pickling_for_dataloader_workers() -> None:
    import pickle

    rope = pickle.loads(pickle.dumps(RopeIndex("Qwen2VLModel", transformers.Qwen2VLConfig())))
    example = {
        "input_ids": [1, 2, 3, 4, 5, 6],
        "mm_token_type_ids": [0, 1, 1, 1, 1, 0],
        "image_grid_thw": torch.tensor([[1, 4, 4]]),  # 2 x 2 merged tokens
    }
    assert rope(example).tolist() == [[0, 1, 1, 1, 1, 3], [0, 1, 1, 2, 2, 3], [0, 1, 2, 1, 2, 3]]
    assert rope({"input_ids": [7, 8, 9]}).tolist() == [[0, 1, 2]] * 3
