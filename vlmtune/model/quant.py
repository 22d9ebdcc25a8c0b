"""bitsandbytes quantisation settings for QLoRA (4-bit) and LLM.int8 (8-bit)."""

from __future__ import annotations

import torch
from transformers import BitsAndBytesConfig

from vlmtune.config.schema import QuantConfig
from vlmtune.families import Family

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "uint8": torch.uint8,
}


def float_modules(q: QuantConfig, family: Family | None) -> list[str] | None:
    """Module prefixes bitsandbytes must leave unquantised, or None for its own default (output head, tied
    weights, the model's `_keep_in_fp32_modules`). A list replaces that default, so it names the head too."""
    if family is None or q.vision == "quantized":
        return None
    return ["lm_head", *family.vision, *family.projector]


def bnb_config(q: QuantConfig, family: Family | None = None) -> BitsAndBytesConfig:
    """The transformers quantization_config for a recipe's `quant` section (and the VLM family, if any)."""
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=float_modules(q, family))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=_DTYPES[q.compute_dtype],
        bnb_4bit_quant_storage=_DTYPES[q.storage_dtype],
        llm_int8_skip_modules=float_modules(q, family),
    )


def unquantized_modules(model, q: QuantConfig | None = None, family: Family | None = None) -> list[str]:
    """Module names that bitsandbytes leaves in float when loading `model` with `bnb_config(q, family)`
    (transformers' own rule; the model's `_keep_in_fp32_modules` always stay)."""
    from transformers.quantizers.base import HfQuantizer

    keep = getattr(model, "_keep_in_fp32_modules", None)
    skip = float_modules(q, family) if q is not None else None
    return HfQuantizer.get_modules_to_not_convert(model, skip, list(keep) if keep else None)


def keep_compute_dtype_on_cpu(model: torch.nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference path for 4-bit layers.

    On a CPU with AVX512-BF16, a 4-bit layer called in eval mode without autograd (a distillation teacher, any
    evaluation) repacks its weights in place for a bf16 kernel: its outputs then move off the compute dtype
    the recipe asks for (about 1e-3 in a loss), and differently once ZeRO-3 / FSDP2 shard the layer, which
    skips the repacking. Every pass then runs the same dequantise-and-matmul path as training.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
