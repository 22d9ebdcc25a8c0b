"""`vlmtune launch` composes the accelerate command from the recipe and the flags, per node."""

import sys

import pytest
import yaml

from tests.conftest import REPO
from vlmtune.errors import UserError
from vlmtune.launch import format_plan, plan_launch

CONFIGS = REPO / "accelerate_configs"


def _recipe(tmp_path, tiny_recipe, accel: dict) -> str:
    cfg = tmp_path / "accel.yaml"
    cfg.write_text(yaml.safe_dump(accel))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(launch={"accelerate_config": str(cfg)})))
    return str(path)


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_multi_node_deepspeed_gets_rank_rendezvous_and_one_launcher_per_node(tmp_path, tiny_recipe):
    recipe = _recipe(
        tmp_path, tiny_recipe, {"distributed_type": "DEEPSPEED", "num_processes": 16, "num_machines": 2}
    )
    plan = plan_launch(
        recipe, ["train.lr=1e-4"], nodes=2, node_rank=1, main_ip="10.0.0.1", main_port=1234, procs_per_node=8
    )
    cmd = plan.command
    assert cmd[:3] == [sys.executable, "-m", "vlmtune.launch"]  # accelerate launch, quiet on worker failure
    assert (_flag(cmd, "--num_machines"), _flag(cmd, "--num_processes"), _flag(cmd, "--machine_rank")) == (
        "2",
        "16",
        "1",
    )
    assert (_flag(cmd, "--main_process_ip"), _flag(cmd, "--main_process_port")) == ("10.0.0.1", "1234")
    assert _flag(cmd, "--deepspeed_multinode_launcher") == "standard"
    assert _flag(cmd, "--mixed_precision") == "no"  # the recipe's, whatever the config file says
    assert _flag(cmd, "--config_file") == str(tmp_path / "accel.yaml")
    assert cmd[-4:] == ["-m", "vlmtune.train", recipe, "train.lr=1e-4"]
    assert "--multi_gpu" not in cmd and plan.world_size == 16
    # DeepSpeed is switched off by accelerate when told to use the CPU, so the launcher never says so.
    assert "ACCELERATE_USE_CPU" not in plan.env


def test_ddp_on_cpu_uses_multi_gpu_with_the_cpu_switch_and_splits_threads(tmp_path, tiny_recipe, monkeypatch):
    for var in ("OMP_NUM_THREADS", "TORCH_NCCL_ASYNC_ERROR_HANDLING"):  # defaults apply only when unset
        monkeypatch.delenv(var, raising=False)
    recipe = _recipe(tmp_path, tiny_recipe, {"distributed_type": "MULTI_GPU", "num_processes": 8})
    plan = plan_launch(recipe, [], procs_per_node=2)
    assert "--multi_gpu" in plan.command and _flag(plan.command, "--num_processes") == "2"
    assert plan.env["ACCELERATE_USE_CPU"] == "true" and int(plan.env["OMP_NUM_THREADS"]) >= 1
    assert plan.env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert "ACCELERATE_USE_CPU=true" in format_plan(plan)


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_accelerate_config_validates_and_launches(config, tmp_path, tiny_recipe):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(launch={"accelerate_config": str(config)})))
    cfg = yaml.safe_load(config.read_text())
    nodes = int(cfg.get("num_machines", 1))
    plan = plan_launch(
        str(recipe), [], nodes=nodes, main_ip="10.0.0.1" if nodes > 1 else None, procs_per_node=2
    )
    assert _flag(plan.command, "--config_file") == str(config)
    assert plan.world_size == nodes * 2


def test_flags_that_cannot_work_are_refused(tmp_path, tiny_recipe):
    recipe = _recipe(tmp_path, tiny_recipe, {"distributed_type": "MULTI_GPU", "num_processes": 2})
    with pytest.raises(UserError, match="--main-ip is required"):
        plan_launch(recipe, [], nodes=2, node_rank=0)
    with pytest.raises(UserError, match=r"--node-rank 2 is outside 0\.\.1"):
        plan_launch(recipe, [], nodes=2, node_rank=2, main_ip="h")


def test_a_bad_recipe_fails_before_anything_starts(tmp_path, tiny_recipe):
    recipe = _recipe(tmp_path, tiny_recipe, {"distributed_type": "NO"})
    with pytest.raises(UserError, match=r"train\.lr"):
        plan_launch(recipe, ["train.lr=-1"])
