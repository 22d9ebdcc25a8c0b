import pytest
import torch

from vlmtune.data.encode import IGNORE_INDEX as IGNORE
from vlmtune.methods.logps import completion_logps, logps_from_logits, reference_logps


def _reference(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Position t scores label t + 1, one position at a time in float64."""
    out = torch.zeros(labels.shape[0], labels.shape[1] - 1, dtype=torch.float64)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] != IGNORE:
                out[b, t] = torch.log_softmax(logits[b, t].double() / temperature, -1)[labels[b, t + 1]]
    return out


def _batch(g: torch.Generator, vocab: int = 13):
    logits = torch.randn(3, 7, vocab, generator=g)
    labels = torch.randint(0, vocab, (3, 7), generator=g)
    labels[0, :3] = IGNORE  # a prompt
    labels[1, 5:] = IGNORE  # padding
    labels[2, :] = IGNORE  # nothing trained
    return logits, labels


@pytest.mark.parametrize("chunk", [1, 4, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logps_are_the_shifted_log_softmax_at_trained_positions(chunk, temperature):
    logits, labels = _batch(torch.Generator().manual_seed(0))
    logps, mask = logps_from_logits(logits, labels, temperature=temperature, chunk=chunk)
    assert logps.dtype == torch.float32 and logps.shape == mask.shape == (3, 6)
    assert mask.tolist() == (labels[:, 1:] != IGNORE).tolist()
    torch.testing.assert_close(logps.double(), _reference(logits, labels, temperature), rtol=1e-5, atol=1e-6)
    assert (logps[~mask] == 0).all()


def test_bf16_logits_are_scored_in_float32():
    logits, labels = _batch(torch.Generator().manual_seed(1))
    logps, _ = logps_from_logits(logits.bfloat16(), labels)
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps.double(), _reference(logits.bfloat16(), labels), rtol=1e-5, atol=1e-5)


def test_gradient_through_the_chunks_equals_the_unchunked_one():
    logits, labels = _batch(torch.Generator().manual_seed(2))
    grads = []
    for chunk in (2, 1024):
        x = logits.clone().requires_grad_()
        logps, _ = logps_from_logits(x, labels, chunk=chunk)
        (logps * torch.arange(1.0, 7.0)).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])
    # Only positions predicting a trained token get a gradient; the last position never does.
    assert grads[0][:, -1].abs().sum() == 0 and grads[0][2].abs().sum() == 0
    assert grads[0][0, :2].abs().sum() == 0 and grads[0][0, 2].abs().sum() > 0


@pytest.fixture(scope="module")
def peft_llm(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # LoRA B starts at zero: move it so the adapter changes the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.eval()


def _token_batch():
    ids = torch.tensor([[5, 9, 14, 20, 7, 3], [8, 11, 4, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, 20, 7, 3], [IGNORE, IGNORE, 4, 6, IGNORE, IGNORE]])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pairs": torch.tensor(1)}


def test_completion_logps_score_the_model_and_leave_out_excluded_entries(peft_llm):
    batch = _token_batch()
    logps, mask = completion_logps(peft_llm, batch, exclude=("pairs",))
    with torch.no_grad():
        logits = peft_llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(logps.double(), _reference(logits, batch["labels"]), rtol=1e-5, atol=1e-6)
    assert mask.sum() == 5


def test_reference_is_the_base_model_without_gradients_and_the_adapter_comes_back(peft_llm):
    batch = _token_batch()
    ref, _ = reference_logps(peft_llm, batch, exclude=("pairs",))
    assert not ref.requires_grad
    with torch.no_grad(), peft_llm.disable_adapter():
        base = peft_llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(ref.double(), _reference(base, batch["labels"]), rtol=1e-5, atol=1e-6)
    policy, _ = completion_logps(peft_llm, batch, exclude=("pairs",))
    assert (policy - ref).abs().max() > 1e-3  # the adapter is on again
    assert policy.requires_grad
