import socket
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from vlmtune.config.accelerate import parse_launch_spec
from vlmtune.engine.distributed import (
    check_sharding,
    configure_ddp,
    params_without_grad,
    strategy,
    unused_parameters_error,
)
from vlmtune.errors import UserError


def _acc(dist=DistributedType.MULTI_GPU, n=2):
    return SimpleNamespace(distributed_type=dist, num_processes=n, ddp_handler=None)


class _VLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vision_tower = torch.nn.Linear(2, 2)
        self.language_model = torch.nn.Linear(2, 2)

    def forward(self, x, image=None):
        return self.language_model(x if image is None else x + self.vision_tower(image))


def test_strategy_names():
    assert strategy(_acc(DistributedType.NO, 1)) == "none"
    assert strategy(_acc(DistributedType.MULTI_CPU, 2)) == "ddp"
    assert strategy(_acc(DistributedType.DEEPSPEED)) == "deepspeed"
    assert strategy(_acc(DistributedType.FSDP)) == "fsdp2"


def test_unused_parameter_detection_is_on_only_when_a_trainable_part_can_be_skipped(tmp_path):
    from transformers import AutoModelForImageTextToText

    from vlmtune.testing.tiny_vlm import build_tiny_vlm

    vlm = AutoModelForImageTextToText.from_pretrained(build_tiny_vlm("llava", tmp_path / "llava"))
    vlm.requires_grad_(False)
    vlm.model.language_model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    acc = _acc()
    configure_ddp(acc, vlm)
    assert not acc.ddp_handler.find_unused_parameters
    vlm.model.multi_modal_projector.requires_grad_(True)  # a text-only batch leaves it without gradient
    configure_ddp(acc, vlm)
    assert acc.ddp_handler.find_unused_parameters
    configure_ddp(acc, torch.nn.Linear(2, 2).requires_grad_(True))  # not a known VLM: a text model
    assert not acc.ddp_handler.find_unused_parameters


def test_ddps_unused_parameter_error_names_the_parameters():
    model = _VLM()
    model(torch.ones(1, 2)).sum().backward()  # a text-only batch: the tower gets no gradient
    names = params_without_grad(model)
    assert names == ["vision_tower.weight", "vision_tower.bias"]
    ddp_error = RuntimeError(
        "Expected to have finished reduction in the prior iteration before starting a new one"
    )
    err = unused_parameters_error(ddp_error, names)
    assert isinstance(err, UserError) and "vision_tower.weight, vision_tower.bias" in str(err)
    assert unused_parameters_error(RuntimeError("CUDA out of memory"), names) is None


def test_a_silent_fallback_to_ddp_is_caught_after_prepare():
    with pytest.raises(UserError, match="asks for fsdp2 but ddp is in effect"):
        check_sharding(
            _acc(DistributedType.MULTI_CPU),
            torch.nn.Linear(2, 2),
            parse_launch_spec({"distributed_type": "FSDP"}),
        )
    with pytest.raises(UserError, match="asks for deepspeed but none is in effect"):
        check_sharding(
            _acc(DistributedType.NO, 1),
            torch.nn.Linear(2, 2),
            parse_launch_spec({"distributed_type": "DEEPSPEED"}),
        )
    with pytest.raises(UserError, match="not DistributedDataParallel"):
        check_sharding(
            _acc(DistributedType.MULTI_GPU),
            torch.nn.Linear(2, 2),
            parse_launch_spec({"distributed_type": "MULTI_GPU"}),
        )
    check_sharding(
        _acc(DistributedType.NO, 1), torch.nn.Linear(2, 2), parse_launch_spec({"distributed_type": "NO"})
    )


def test_the_collective_timeout_is_shortened_after_loading(monkeypatch):
    from datetime import timedelta

    import torch.distributed as dist

    from vlmtune.engine.distributed import set_collective_timeout

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(sock.getsockname()[1]))
    dist.init_process_group("gloo", rank=0, world_size=1, timeout=timedelta(minutes=60))
    try:
        backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
        set_collective_timeout(_acc(n=2), timedelta(minutes=3))
        assert backend.options._timeout == timedelta(minutes=3)
    finally:
        dist.destroy_process_group()
