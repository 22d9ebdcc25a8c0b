"""On a CUDA machine with flash-attn: packed image-text rows through flash-attention's varlen path, in bf16.

As `tests/unit/data/test_vlm_packing.py` on CPU: every example of a packed row (bins laid end to end in one row,
as `OneRowPackedCollator` gives flash-attention) gets the logits it gets alone, to bf16 rounding, and the LoRA
gradients equal the padded batch's. Skipped without a GPU or without the flash-attn package.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmtune.config.schema import DataConfig, DataSource
from vlmtune.data import Collator, build_dataset
from vlmtune.data.packing import OneRowPackedCollator
from vlmtune.data.positions import RopeIndex
from vlmtune.engine.loop import forward, token_loss_sum
from vlmtune.families import FAMILIES, get_family
from vlmtune.model.parts import lm_lora_targets
from vlmtune.testing.tiny_vlm import build_tiny_vlm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs the flash-attn package"),
]

PACKABLE = [name for name, f in FAMILIES.items() if not f.packing_refused]
ROWS = [
    {"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "Red."}]},
    {
        "messages": [
            {"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": "Hello there."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "<image>And this?"},
            {"role": "assistant", "content": "Wide."},
        ]
    },
]


@pytest.fixture(scope="module", params=PACKABLE)
def tiny(request, tiny_vlm_root: Path, tmp_path_factory):
    family = get_family(request.param)
    root = tmp_path_factory.mktemp("gpu_pack")
    Image.new("RGB", (100, 50), (220, 30, 30)).save(root / "a.png")
    Image.new("RGB", (120, 40), (30, 200, 30)).save(root / "b.png")
    rows = [dict(ROWS[0], images=["a.png"]), ROWS[1], dict(ROWS[2], images=["b.png"])]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = build_tiny_vlm(family.name, tiny_vlm_root / family.name)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = family.load_class().from_pretrained(
        path, dtype=torch.bfloat16, attn_implementation="flash_attention_2", local_files_only=True
    )
    model = model.cuda().eval()
    for config in (model.config, model.config.text_config):
        config.use_cache = False
    cfg = DataConfig(train=[DataSource(path=str(root / "rows.jsonl"), image_root=str(root))], cache=False)
    data = build_dataset(cfg.train, cfg, processor, family=family, seed=0)
    return family, processor, model, [data[i] for i in range(len(data))]


def _cuda(batch: dict) -> dict:
    return {k: v.cuda() for k, v in batch.items()}


def test_flash_attention_packed_examples_equal_alone_in_bf16(tiny) -> None:
    family, processor, model, examples = tiny
    padded = Collator(processor.tokenizer.pad_token_id, family)
    rope = RopeIndex(family.rope_index, model.config) if family.rope_index else None
    batch = OneRowPackedCollator(processor.tokenizer.pad_token_id, padded, rope)([examples[:2], examples[2:]])
    assert batch["input_ids"].shape[0] == 1
    with torch.no_grad():
        logits = forward(model, _cuda(batch), torch.bfloat16).float()
        start = 0
        for example in examples:
            n = len(example["input_ids"])
            ref = forward(model, _cuda(padded([example])), torch.bfloat16)[0].float()
            assert (logits[0, start : start + n] - ref).abs().max() <= 3e-2 * ref.abs().max(), start
            start += n


def test_flash_attention_packed_lora_gradients_equal_the_padded_ones(tiny) -> None:
    from peft import LoraConfig, get_peft_model

    family, processor, model, examples = tiny
    padded = Collator(processor.tokenizer.pad_token_id, family)
    rope = RopeIndex(family.rope_index, model.config) if family.rope_index else None
    packed = OneRowPackedCollator(processor.tokenizer.pad_token_id, padded, rope)
    peft_model = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8, target_modules=lm_lora_targets(model, family), init_lora_weights=False),
    )
    try:
        grads = []
        for batch in (padded(examples), packed([examples[:2], examples[2:]])):
            peft_model.zero_grad()
            batch = _cuda(batch)
            token_loss_sum(forward(peft_model, batch, torch.bfloat16), batch["labels"]).backward()
            grads.append({n: p.grad.float() for n, p in peft_model.named_parameters() if p.requires_grad})
        for name, ref in grads[0].items():
            err = (grads[1][name] - ref).norm() / ref.norm().clamp_min(1e-12)
            assert err < 5e-2, (name, float(err))
    finally:
        peft_model.unload()
