import itertools
import random

import numpy as np
import pytest
import torch

from vlmtune.config.schema import TrainConfig
from vlmtune.engine.optim import build_optimizer, build_scheduler
from vlmtune.engine.state import TrainState, rng_state, set_rng_state


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(output_dir="x", **kw)


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_warmup_then_schedule(name):
    model = torch.nn.Linear(4, 4)
    cfg = _cfg(lr=1.0, scheduler=name, warmup_ratio=0.2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.5) and lrs[2] == pytest.approx(1.0)
    if name == "constant":
        assert lrs[-1] == pytest.approx(1.0)
    else:
        assert lrs[-1] < 0.2 and all(a >= b for a, b in itertools.pairwise(lrs[2:]))


def test_weight_decay_only_on_matrices_and_only_trainable():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    opt = build_optimizer(model, _cfg(weight_decay=0.1))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and [p.shape for p in decayed["params"]] == [torch.Size([4, 4])]
    assert (
        plain["weight_decay"] == 0.0 and len(plain["params"]) == 4
    )  # 2 biases of trainable + LN weight, bias


def test_rng_state_roundtrip_through_weights_only_load(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_train_state_roundtrip():
    s = TrainState(step=5, trained_tokens=100)
    t = TrainState()
    t.load_state_dict(s.state_dict() | {"unknown_future_key": 1})
    assert t == s
