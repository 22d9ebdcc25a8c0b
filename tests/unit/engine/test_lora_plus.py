"""LoRA+ (`lora.plus_lr_ratio`): the LoRA B matrices learn at a multiple of the A matrices' rate."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from vlmtune.config.schema import TrainConfig
from vlmtune.engine.optim import build_optimizer, build_scheduler


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(x)))


def _lora_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # Random B as well as A (not PEFT's zero B), so both matrices have a gradient in the first step.
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["proj", "head"], init_lora_weights=False)
    return get_peft_model(_Tiny(), cfg)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(output_dir="x", lr=1e-3, weight_decay=0.1, **kw)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_b_matrices_get_their_own_group_at_ratio_times_the_rate(optimizer):
    if optimizer != "adamw":
        pytest.importorskip("bitsandbytes")
    model = _lora_model()
    names = {id(p): n for n, p in model.named_parameters()}
    opt = build_optimizer(model, _cfg(optimizer=optimizer), plus_lr_ratio=16.0)
    groups = [
        (g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in opt.param_groups
    ]
    assert [(lr, wd) for lr, wd, _ in groups] == [(1e-3, 0.1), (pytest.approx(1.6e-2), 0.1)]
    assert all("lora_A" in n for n in groups[0][2]) and len(groups[0][2]) == 2
    assert all("lora_B" in n for n in groups[1][2]) and len(groups[1][2]) == 2
    # Without the ratio there is no B group: the same groups as before LoRA+ existed.
    assert len(build_optimizer(model, _cfg(optimizer=optimizer)).param_groups) == 1


def test_the_schedule_keeps_the_ratio_at_every_step():
    model = _lora_model()
    cfg = _cfg(scheduler="cosine", warmup_ratio=0.3)
    opt = build_optimizer(model, cfg, plus_lr_ratio=4.0)
    sched = build_scheduler(opt, cfg, total_steps=10)
    for _ in range(10):
        a, b = sched.get_last_lr()
        assert b == pytest.approx(4.0 * a)
        opt.step()
        sched.step()
    assert 0 < a < 1e-3  # the schedule did move the rates


def _one_step(ratio: float | None) -> dict[str, torch.Tensor]:
    model = _lora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = build_optimizer(model, _cfg(), plus_lr_ratio=ratio)
    torch.manual_seed(1)
    model(torch.randn(5, 8)).pow(2).sum().backward()
    opt.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}


def test_one_step_moves_b_ratio_times_as_far_and_a_the_same():
    ratio = 8.0
    plain, plus = _one_step(None), _one_step(ratio)
    for name, delta in plain.items():
        assert delta.abs().max() > 0, name
        expected = ratio * delta if "lora_B" in name else delta
        torch.testing.assert_close(plus[name], expected, rtol=1e-4, atol=1e-9)


def test_the_recipe_key_reaches_the_optimizer(tiny_recipe, monkeypatch, one_thread):
    import vlmtune.engine.optim as optim
    from vlmtune.train import run

    built, real = [], optim.build_optimizer

    def build(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(optim, "build_optimizer", build)
    run(tiny_recipe(lora={"plus_lr_ratio": 4.0}, train={"max_steps": 1, "lr": 1e-3}))
    (opt,) = built
    assert [g["initial_lr"] for g in opt.param_groups] == [1e-3, pytest.approx(4e-3)]
