"""Activation offloading changes where saved tensors wait, not the numbers."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from vlmtune.config.schema import LoraConfig
from vlmtune.engine.loop import forward, token_loss_sum
from vlmtune.engine.offload import OffloadActivations
from vlmtune.model.lora import apply_lora

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("checkpointing", [True, False])
def test_offloaded_step_has_the_same_loss_and_gradients(tiny_model_dir, checkpointing):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = apply_lora(
        model, LoraConfig(r=4, alpha=8, dropout=0.0), quantized=False, gradient_checkpointing=checkpointing
    ).train()
    with torch.no_grad():  # LoRA B starts at zero, which would leave A without gradient
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step(context):
        with context:
            loss = token_loss_sum(forward(model, batch), ids)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    loss, grads = step(torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
    # pin_memory needs CUDA; on the CPU the copies are real copies all the same.
    offload = OffloadActivations(pin_memory=False)
    offloaded_loss, offloaded_grads = step(offload)
    # With checkpointing only the layer inputs (saved by the checkpoint) and the head's input are offloaded.
    assert offload.copied >= model.config.num_hidden_layers
    # Copies are contiguous, so a saved view can take another matmul kernel: equal to float rounding.
    torch.testing.assert_close(offloaded_loss, loss, rtol=1e-6, atol=0)
    assert all(g.abs().max() > 0 for g in grads.values())
    for name, g in grads.items():
        torch.testing.assert_close(offloaded_grads[name], g, rtol=1e-5, atol=1e-5)


def test_parameters_and_small_tensors_stay_put():
    weight = torch.nn.Parameter(torch.randn(64, 64))
    x = torch.randn(8, 64, requires_grad=True)
    offload = OffloadActivations(pin_memory=False, min_bytes=8 * 64 * 4)
    with offload:
        (x @ weight).sum().backward()  # saves x (2 KiB: offloaded) and weight (a parameter: kept)
    assert offload.copied == 1
