"""Loading a base model: an architecture without an sdpa path falls back to eager attention and says so."""

import logging

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from vlmtune.config.schema import ModelConfig
from vlmtune.model.load import load_model


def test_a_model_without_sdpa_loads_with_eager_attention(tmp_path, caplog):
    config = AutoConfig.for_model(
        "gemma2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="vlmtune"):
        model = load_model(
            ModelConfig(path=str(tmp_path), attn_implementation="sdpa"), None, device=torch.device("cpu")
        )
    assert model.config._attn_implementation == "eager"
    assert "Gemma2ForCausalLM does not support an attention implementation" in caplog.text
    assert "using eager attention" in caplog.text
