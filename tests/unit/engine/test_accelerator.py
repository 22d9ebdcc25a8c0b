import pytest

from vlmtune.config.accelerate import parse_launch_spec
from vlmtune.engine.accelerator import check_launch
from vlmtune.errors import UserError


def test_single_process_launch_matches_a_single_gpu_config(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    check_launch(parse_launch_spec({"distributed_type": "NO", "num_processes": 1}))
    check_launch(parse_launch_spec({}))


def test_launcher_sharding_that_contradicts_the_recipe_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserError, match=r"launcher enables DeepSpeed .* distributed_type MULTI_GPU"):
        check_launch(parse_launch_spec({"distributed_type": "MULTI_GPU"}))
    check_launch(parse_launch_spec({"distributed_type": "DEEPSPEED"}))


def test_a_single_process_launch_of_a_multi_process_config_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(UserError, match=r"expects 8 processes .* single-process launch"):
        check_launch(parse_launch_spec({"distributed_type": "DEEPSPEED", "num_processes": 8}))
    # Another process count than the file's is an ordinary override (more nodes, fewer GPUs).
    monkeypatch.setenv("WORLD_SIZE", "16")
    check_launch(parse_launch_spec({"distributed_type": "DEEPSPEED", "num_processes": 8}))
