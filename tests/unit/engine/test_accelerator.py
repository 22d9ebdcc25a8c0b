import pytest

from vlmtune.engine.accelerator import check_launch
from vlmtune.errors import UserError


def test_single_process_launch_matches_a_single_gpu_config(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    check_launch({"distributed_type": "NO", "num_processes": 1})
    check_launch({})


def test_launcher_sharding_that_contradicts_the_recipe_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserError, match=r"launcher enables DeepSpeed .* distributed_type MULTI_GPU"):
        check_launch({"distributed_type": "MULTI_GPU"})
    check_launch({"distributed_type": "DEEPSPEED"})


def test_process_count_must_match(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="expects num_processes 8 but this launch has 2"):
        check_launch({"distributed_type": "MULTI_GPU", "num_processes": 8})
    check_launch({"distributed_type": "MULTI_GPU", "num_processes": 2})
