"""The chunked loss equals the standard one (loss and gradients, fp32) and never builds full-vocabulary logits."""

from functools import partial

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from tests.unit.engine.test_vision_sync import tiny_vlm_batch
from vlmtune.config.schema import LoraConfig
from vlmtune.engine.loop import forward, token_loss_sum
from vlmtune.engine.loss import (
    LeanLoss,
    chunked_cross_entropy_sum,
    linear_cross_entropy_sum,
    plain_linear,
    trained_rows,
)
from vlmtune.errors import UserError
from vlmtune.families import FAMILIES
from vlmtune.model.lora import apply_lora

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise_adapters(model) -> None:
    """LoRA B starts at zero, which leaves A without gradient: give every trainable weight random values."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    # lm_head trained in full too: its gradient must match as well, through PEFT's wrapper.
    cfg = LoraConfig(r=4, alpha=8, dropout=0.0, modules_to_save=["lm_head"])
    model = apply_lora(model, cfg, quantized=False, gradient_checkpointing=True)
    _randomise_adapters(model)
    return model.train()


def _text_batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 24), generator=g)
    labels = ids.clone()
    labels[:, :8] = -100  # a prompt
    labels[2, 15:] = -100  # a shorter row, right-padded
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_equal_to_standard(model, batch, chunk: int) -> None:
    standard = _loss_and_grads(model, lambda: token_loss_sum(forward(model, batch), batch["labels"]))
    lean = LeanLoss(model, "chunked", chunk)
    chunked = _loss_and_grads(model, lambda: lean(partial(forward, model, batch), batch))
    torch.testing.assert_close(chunked[0], standard[0], rtol=1e-6, atol=1e-5)
    assert standard[1].keys() == chunked[1].keys()
    assert all(g.abs().max() > 0 for g in standard[1].values())  # every compared gradient is a real one
    for name, g in standard[1].items():
        # fp32 rounding differs with the order of the sums: tolerate it relative to the gradient's scale.
        torch.testing.assert_close(chunked[1][name], g, rtol=1e-5, atol=1e-6 * float(g.abs().max()), msg=name)


@pytest.mark.parametrize("chunk", [5, 4096])  # many chunks (one cut mid-row), and one chunk for all
def test_chunked_loss_and_gradients_equal_standard_on_the_tiny_llm(llm, chunk):
    _assert_equal_to_standard(llm, _text_batch(llm.config.vocab_size), chunk)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_chunked_loss_and_gradients_equal_standard_on_every_vlm_family(name, tiny_vlm_root, tmp_path):
    family, model, collate, encoded = tiny_vlm_batch(name, tiny_vlm_root, tmp_path)
    with (
        torch.no_grad()
    ):  # Mllama's zero-initialised cross-attention gates would leave those layers no gradient
        for n, p in model.named_parameters():
            if n.endswith(("attn_gate", "mlp_gate")):
                p.fill_(1.0)
    model = apply_lora(
        model.float(),
        LoraConfig(r=4, alpha=8, dropout=0.0),
        quantized=False,
        gradient_checkpointing=False,
        family=family,
    )
    _randomise_adapters(model)
    _assert_equal_to_standard(model.train(), collate([encoded["image"], encoded["image"]]), chunk=4)


def test_a_lora_adapted_head_goes_through_autograd_and_equals_standard(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "lm_head"])
    model = apply_lora(model, cfg, quantized=False, gradient_checkpointing=False)
    _randomise_adapters(model)
    head = model.get_output_embeddings()
    assert plain_linear(head) is None  # so the checkpointed per-chunk path runs
    assert any("lm_head.lora_A" in n for n, p in model.named_parameters() if p.requires_grad)
    _assert_equal_to_standard(model.train(), _text_batch(model.config.vocab_size), chunk=5)


def test_plain_linear_sees_through_modules_to_save_and_not_through_lora(llm):
    head = llm.get_output_embeddings()
    assert plain_linear(head) is head.modules_to_save["default"]
    with llm.disable_adapter():
        assert plain_linear(head) is head.original_module
    assert plain_linear(torch.nn.Linear(2, 3)) is not None
    assert plain_linear(torch.nn.Embedding(2, 3)) is None


def test_a_sharded_trained_head_is_refused(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=4, alpha=8, dropout=0.0, modules_to_save=["lm_head"])
    model = apply_lora(model, cfg, quantized=False, gradient_checkpointing=False)
    for p in model.get_output_embeddings().parameters():
        p.ds_id = 0  # what ZeRO-3 marks its partitioned parameters with
    with pytest.raises(UserError, match=r"under ZeRO-3 / FSDP2 needs a frozen, plain linear output head"):
        LeanLoss(model, "chunked", 8)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_linear_cross_entropy_gradients_equal_autograd(softcap):
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(11, 6, generator=g, requires_grad=True)
    weight = torch.randn(13, 6, generator=g, requires_grad=True)
    bias = torch.randn(13, generator=g, requires_grad=True)
    targets = torch.randint(0, 13, (11,), generator=g)
    ours = linear_cross_entropy_sum(rows, targets, weight, bias, chunk=4, softcap=softcap) * 0.5
    ours_grads = torch.autograd.grad(ours, (rows, weight, bias))
    logits = torch.nn.functional.linear(rows, weight, bias)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    ref = torch.nn.functional.cross_entropy(logits, targets, reduction="sum") * 0.5
    torch.testing.assert_close(ours, ref)
    for mine, theirs in zip(ours_grads, torch.autograd.grad(ref, (rows, weight, bias)), strict=True):
        torch.testing.assert_close(mine, theirs)


def test_eval_without_grad_equals_standard(llm):
    batch = _text_batch(llm.config.vocab_size)
    lean = LeanLoss(llm, "chunked", 6)
    with torch.no_grad():
        expected = token_loss_sum(forward(llm, batch), batch["labels"])
        torch.testing.assert_close(lean(partial(forward, llm, batch), batch), expected, rtol=1e-6, atol=1e-5)


class _LogitRows(TorchDispatchMode):
    """Records the most rows of any fp32 (..., vocab) tensor made in forward or backward (the head's weight
    seen as (hidden, vocab) is not logits and is left out)."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.vocab, self.hidden, self.largest = vocab, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if (
                isinstance(t, torch.Tensor)
                and t.dtype == torch.float32
                and t.dim()
                and t.shape[-1] == self.vocab
                and tuple(t.shape) != (self.hidden, self.vocab)
            ):
                self.largest = max(self.largest, t.numel() // self.vocab)
        return out


def test_chunked_path_never_holds_more_than_a_chunk_of_logits(llm):
    batch = _text_batch(llm.config.vocab_size)
    vocab, hidden = llm.config.vocab_size, llm.config.hidden_size
    lean = LeanLoss(llm, "chunked", 4)
    lean(partial(forward, llm, batch), batch)  # the one-time head check runs outside the measurement
    with _LogitRows(vocab, hidden) as chunked:
        lean(partial(forward, llm, batch), batch).backward()
    # One chunk (4 rows); the model itself computes one position per row (3 rows).
    assert chunked.largest == 4
    with _LogitRows(vocab, hidden) as standard:
        token_loss_sum(forward(llm, batch), batch["labels"]).backward()
    assert standard.largest >= 3 * 23  # the meter does see the standard path's full logits
    llm.zero_grad(set_to_none=True)


def test_no_trained_token_gives_zero_loss_with_a_graph():
    rows = torch.randn(0, 8, requires_grad=True)
    loss = chunked_cross_entropy_sum(rows, torch.zeros(0, dtype=torch.long), torch.nn.Linear(8, 10), 4)
    loss.backward()
    assert float(loss.detach()) == 0.0 and rows.grad is not None
    head = torch.nn.Linear(8, 10)
    loss = linear_cross_entropy_sum(rows, torch.zeros(0, dtype=torch.long), head.weight, head.bias, 4)
    loss.backward()  # the head still gets a (zero) gradient, so DDP's reducer sees every parameter
    assert float(loss.detach()) == 0.0 and not head.weight.grad.any() and head.bias.grad is not None


def test_trained_rows_pair_each_position_with_the_next_label():
    hidden = torch.arange(12.0).reshape(1, 6, 2)
    labels = torch.tensor([[-100, -100, 7, 8, -100, 9]])
    rows, targets = trained_rows(hidden, labels)
    assert targets.tolist() == [7, 8, 9]
    assert rows.tolist() == [[2.0, 3.0], [4.0, 5.0], [8.0, 9.0]]  # positions 1, 2 and 4


def test_a_model_whose_logits_differ_from_its_head_is_refused(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    # Llama does not soft-cap; a config that says it does makes our head and the model's logits disagree.
    model.config.final_logit_softcapping = 0.5
    batch = _text_batch(model.config.vocab_size)
    lean = LeanLoss(model, "chunked", 8)
    with pytest.raises(UserError, match=r"train\.loss: chunked: this model transforms its logits"):
        lean(partial(forward, model, batch), batch)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_liger_without_a_gpu_is_refused(llm):
    with pytest.raises(UserError, match=r"train\.loss: liger .*needs a CUDA GPU; use train\.loss: chunked"):
        LeanLoss(llm, "liger", 1024)
