"""train.compile: compiled blocks give the same loss and gradients as eager ones."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from vlmtune.config.schema import LoraConfig
from vlmtune.engine.loop import forward, token_loss_sum
from vlmtune.errors import UserError
from vlmtune.model.compile import compile_blocks
from vlmtune.model.lora import apply_lora

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compiled_step_matches_eager(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = apply_lora(
        model, LoraConfig(r=4, alpha=8, dropout=0.0), quantized=False, gradient_checkpointing=True
    ).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step():
        loss = token_loss_sum(forward(model, batch), ids)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    names = {n for n, _ in model.named_parameters()}
    loss, grads = step()
    # aot_eager traces the same graphs (forward and backward) as inductor, without its code generation, which
    # takes ~2 minutes on this 2-core CPU; the inductor path runs in `vlmtune train` with train.compile.
    assert compile_blocks(model, backend="aot_eager") == model.config.num_hidden_layers
    compiled_loss, compiled_grads = step()
    assert {n for n, _ in model.named_parameters()} == names  # checkpoints and adapters keep their keys
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == compiled_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(compiled_grads[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_a_model_without_blocks_is_refused():
    with pytest.raises(UserError, match=r"train\.compile: found no repeated blocks"):
        compile_blocks(torch.nn.Linear(2, 2))
