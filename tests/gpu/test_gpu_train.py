"""On a CUDA machine: bf16 autocast, fp16 loss scaling and 4-bit QLoRA on the GPU (skipped without one)."""

import json

import pytest
import torch

from vlmtune.train import run

pytestmark = pytest.mark.gpu


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("model_dtype", "precision", "quant"),
    [
        ("bfloat16", "bf16", None),
        ("float32", "fp16", None),
        ("bfloat16", "bf16", {"bits": 4, "compute_dtype": "bfloat16", "storage_dtype": "bfloat16"}),
        ("bfloat16", "bf16", {"bits": 8}),
    ],
    ids=["bf16", "fp16-scaler", "qlora-4bit", "8bit"],
)
def test_trains_on_cuda(tiny_recipe, model_dtype, precision, quant):
    recipe = tiny_recipe(
        model={"dtype": model_dtype},
        train={"mixed_precision": precision, "max_steps": 20, "gradient_checkpointing": True},
        launch={"accelerate_config": None},
    )
    if quant:
        recipe["quant"] = quant
    result = run(recipe)
    losses = _losses(result.output_dir)
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.3, losses
    assert torch.cuda.max_memory_allocated() > 0
