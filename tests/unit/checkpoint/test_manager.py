import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from vlmtune.checkpoint.export import replace_dir, verify_adapter
from vlmtune.checkpoint.manager import CheckpointManager
from vlmtune.engine.state import TrainState
from vlmtune.errors import UserError


class _OneProcess:
    """The slice of accelerate.Accelerator that the manager uses, for one process."""

    distributed_type = "NO"
    is_main_process = True
    process_index = 0
    num_processes = 1
    scaler = None

    def wait_for_everyone(self):
        pass

    def unwrap_model(self, model):
        return model


def _model(seed=0):
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    return get_peft_model(
        base, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False)
    )


def _trio(model):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    sched.step()
    return opt, sched


def test_save_then_load_restores_adapter_optimizer_schedule_and_state(tmp_path):
    model = _model(0)
    opt, sched = _trio(model)
    mgr = CheckpointManager(tmp_path, _OneProcess(), keep_last=2)
    path = mgr.save(3, model, opt, sched, TrainState(step=3, trained_tokens=42))
    assert path.name == "step-3" and (path / "COMPLETE").is_file() and mgr.latest() == path

    other = _model(1)
    opt2 = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad], lr=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1 / (s + 1))
    state = TrainState()
    mgr.load(path, other, opt2, sched2, state)
    for (name, a), b in zip(model.named_parameters(), other.parameters(), strict=True):
        if "lora" in name:
            assert torch.equal(a, b), name
    assert state.step == 3 and state.trained_tokens == 42
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_partial_checkpoints_are_ignored_and_retention_keeps_the_newest(tmp_path):
    model = _model()
    opt, sched = _trio(model)
    mgr = CheckpointManager(tmp_path, _OneProcess(), keep_last=2)
    for step in (1, 2, 3):
        mgr.save(step, model, opt, sched, TrainState(step=step))
    names = sorted(p.name for p in mgr.root.iterdir())
    assert names == ["step-2", "step-3"]
    (mgr.root / "step-9.partial").mkdir()  # a crash mid-save
    (mgr.root / "step-7").mkdir()  # a folder without its marker
    assert mgr.latest() == mgr.root / "step-3"
    mgr.save(4, model, opt, sched, TrainState(step=4))
    assert sorted(p.name for p in mgr.root.iterdir()) == ["step-3", "step-4", "step-7"]
    with pytest.raises(UserError, match="not a complete checkpoint"):
        mgr.load(mgr.root / "step-7", model, opt, sched, TrainState())


def _adapter_dir(tmp_path, tensors, r=2):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": r}))
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({}, "holds no weights"),
        ({"x.lora_A.weight": torch.zeros(0, 8)}, "holds no weights"),
        ({"x.lora_A.weight": torch.full((2, 8), float("nan"))}, "NaN or Inf"),
        ({"x.lora_A.weight": torch.ones(3, 8)}, "has rank 3, config says r=2"),
    ],
    ids=["empty", "size-0", "nan", "rank-mismatch"],
)
def test_verify_adapter_refuses_broken_adapters(tmp_path, tensors, message):
    with pytest.raises(UserError, match=message):
        verify_adapter(_adapter_dir(tmp_path, tensors))


def test_verify_adapter_accepts_a_good_one(tmp_path):
    assert "x.lora_A.weight" in verify_adapter(_adapter_dir(tmp_path, {"x.lora_A.weight": torch.ones(2, 8)}))


def test_replace_dir_swaps_in_the_new_folder(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "f").write_text("new")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "f").write_text("old")
    replace_dir(tmp_path / "new", tmp_path / "dst")
    assert (tmp_path / "dst" / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == [
        "dst"
    ]


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    model = _model(0)
    opt, sched = _trio(model)
    mgr = CheckpointManager(tmp_path, _OneProcess(), keep_last=2)
    first = mgr.save(1, model, opt, sched, TrainState(step=1))

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)  # the first optimizer / scheduler file of the save
    with pytest.raises(
        UserError, match=r"step-2 .*No space left on device\. The last complete checkpoint, step-1"
    ):
        mgr.save(2, model, opt, sched, TrainState(step=2))
    assert mgr.latest() == first and (first / "COMPLETE").is_file()
    assert not (tmp_path / "checkpoints/step-2.partial").exists()


def test_too_little_free_space_is_refused_before_training(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from vlmtune.checkpoint.manager import check_free_space

    usage = namedtuple("usage", "total used free")
    model = _model(0)  # LoRA rank 2 on Linear(8, 8) and Linear(8, 4): 56 trainable parameters
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 0, 10**9))
    check_free_space(tmp_path, model, keep_last=3)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 0, 1000))
    with pytest.raises(
        UserError, match=r"has 1,000\.0 B free.*about 2\.8 KiB \(3 kept \+ 1 being written, 56 trainable"
    ):
        check_free_space(tmp_path, model, keep_last=3)
