"""FLOP counts of a LoRA step, checked against counts worked out by hand for a tiny Llama."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vlmtune.config.schema import LoraConfig
from vlmtune.engine.flops import PEAK_ENV, FlopCounter, flop_counter, peak_flops, sequence_lengths
from vlmtune.engine.loss import unwrap
from vlmtune.errors import UserError
from vlmtune.model.lora import apply_lora


def _tiny(tied: bool):
    config = LlamaConfig(
        vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=tied,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    lora = LoraConfig(r=2, alpha=4, dropout=0.0, target_modules=["q_proj"])
    return unwrap(apply_lora(model, lora, quantized=False, gradient_checkpointing=False))


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_counts_of_a_tiny_llama_with_lora_on_q(tied):
    # Per layer: q 8·8 + k 8·4 + v 8·4 + o 8·8 + gate/up/down 3·8·16 + two norms 2·8 = 592; two layers 1,184;
    # final norm 8; head 10·8 = 80 (tied or not: the embedding lookup itself is free). LoRA on q: (2·8 + 8·2)
    # per layer.
    counter = flop_counter(_tiny(tied))
    assert counter == FlopCounter(trainable=64, frozen=1184 + 8 + 80, layers=2, attn_dim=8)


def test_step_flops_of_two_sequences():
    counter = FlopCounter(trainable=64, frozen=1272, layers=2, attn_dim=8)
    assert counter.dense_per_token() == 6 * 64 + 4 * 1272 == 5472
    # Causal attention: 6·L·d·T(T+1) per sequence = 96·T(T+1): 96·12 + 96·30.
    assert counter.attention([3, 5]) == 4032
    assert counter.step([3, 5]) == 5472 * 8 + 4032 == 47808


def test_sequence_lengths_from_mask_packing_or_shape():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert sequence_lengths({"input_ids": torch.zeros(2, 4), "attention_mask": mask}) == [3, 4]
    packed = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert sequence_lengths({"input_ids": torch.zeros(1, 9), "position_ids": packed}) == [3, 2, 4]
    assert sequence_lengths({"input_ids": torch.zeros(1, 9), "position_ids": packed.expand(3, 1, 9)}) == [
        3,
        2,
        4,
    ]
    assert sequence_lengths({"input_ids": torch.zeros(2, 5)}) == [5, 5]


def test_peak_flops_from_the_environment_or_unknown(monkeypatch):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    assert peak_flops(torch.device("cpu")) is None
    monkeypatch.setenv(PEAK_ENV, "989")
    assert peak_flops(torch.device("cpu")) == 989e12
    monkeypatch.setenv(PEAK_ENV, "fast")
    with pytest.raises(UserError, match=r"\$VLMTUNE_PEAK_TFLOPS='fast': expected a number"):
        peak_flops(torch.device("cpu"))


def test_a_vlm_counts_its_language_model_only(tiny_vlm_root):
    from vlmtune.families import get_family
    from vlmtune.testing.tiny_vlm import build_tiny_vlm

    family = get_family("llava")
    model = family.load_class().from_pretrained(build_tiny_vlm("llava", tiny_vlm_root / "llava"))
    vision = sum(
        p.numel()
        for m in (model.model.vision_tower, model.model.multi_modal_projector)
        for p in m.parameters()
    )
    text = model.config.text_config
    with_vision, language = flop_counter(model), flop_counter(model, family)
    assert with_vision.trainable - language.trainable == vision > 0  # no LoRA here: every weight has grad
    assert (language.layers, language.attn_dim) == (
        text.num_hidden_layers,
        text.num_attention_heads * text.head_dim,
    )
