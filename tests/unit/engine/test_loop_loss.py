import pytest
import torch

from vlmtune.data.encode import IGNORE_INDEX as IGNORE
from vlmtune.engine.loop import token_loss_sum, trained_tokens


def _reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts label t+1, summed over labelled positions, one at a time."""
    total = torch.zeros((), dtype=torch.float64)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] != IGNORE:
                total -= torch.log_softmax(logits[b, t].double(), -1)[labels[b, t + 1]]
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_loss_sum_is_the_shifted_sum_over_trained_positions(dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g).to(dtype)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = IGNORE  # a prompt
    labels[1, 5:] = IGNORE  # padding
    labels[2, -1] = IGNORE
    loss = token_loss_sum(logits, labels)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_reference(logits, labels).item(), rel=1e-5)
    assert trained_tokens(labels) == int((labels[:, 1:] != IGNORE).sum()) == 4 + 4 + 5


def test_first_label_is_never_a_target_and_last_logit_never_used():
    logits = torch.zeros(1, 4, 5, requires_grad=True)
    labels = torch.tensor([[2, IGNORE, IGNORE, 3]])
    token_loss_sum(logits, labels).backward()
    # Only position 2 predicts a labelled token (3); label 0 has no predicting position.
    assert logits.grad[0].abs().sum(-1).nonzero().flatten().tolist() == [2]


def test_the_loop_frees_the_logits_before_backward(tiny_recipe, monkeypatch, one_thread):
    """Holding the logits through backward costs a batch × length × vocab tensor of peak memory."""
    import weakref

    import vlmtune.engine.loop as loop
    from vlmtune.train import run

    real_forward, real_loss = loop.forward, loop.token_loss_sum
    refs, alive_in_backward = [], []

    def forward(*args, **kwargs):
        logits = real_forward(*args, **kwargs)
        refs.append(weakref.ref(logits))
        return logits

    def loss_sum(logits, labels):
        loss = real_loss(logits, labels)
        ref = refs[-1]
        loss.register_hook(lambda grad: alive_in_backward.append(ref() is not None))
        return loss

    monkeypatch.setattr(loop, "forward", forward)
    monkeypatch.setattr(loop, "token_loss_sum", loss_sum)
    run(tiny_recipe(train={"max_steps": 2}))
    assert alive_in_backward == [False, False]
