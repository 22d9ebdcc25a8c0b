"""bitsandbytes quantisation settings for QLoRA (4-bit) and LLM.int8 (8-bit)."""

from __future__ import annotations

import torch
from transformers import BitsAndBytesConfig

from vlmtune.config.schema import QuantConfig

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "uint8": torch.uint8,
}


def bnb_config(q: QuantConfig) -> BitsAndBytesConfig:
    """The transformers quantization_config for a recipe's `quant` section."""
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=_DTYPES[q.compute_dtype],
        bnb_4bit_quant_storage=_DTYPES[q.storage_dtype],
    )


def unquantized_modules(model) -> list[str]:
    """Module names that bitsandbytes leaves in float when loading `model` (transformers' own rule: the output
    head, tied weights, the last module and the model's `_keep_in_fp32_modules`)."""
    from transformers.quantizers.base import HfQuantizer

    keep = getattr(model, "_keep_in_fp32_modules", None)
    return HfQuantizer.get_modules_to_not_convert(model, None, list(keep) if keep else None)
