"""The accelerate config as a typed LaunchSpec, and the recipe settings its sharding cannot run."""

from vlmtune.config.accelerate import launch_problems, parse_launch_spec
from vlmtune.config.schema import Recipe


def _recipe(model: dict | None = None, **sections) -> Recipe:
    return Recipe.model_validate(
        {
            "model": {"path": "org/name", **(model or {})},
            "data": {"train": [{"path": "a.json"}]},
            "train": {"output_dir": "out"},
            **sections,
        }
    )


def test_compile_under_deepspeed_is_refused():
    problems = launch_problems(
        _recipe(train={"output_dir": "out", "compile": True}),
        parse_launch_spec({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 2}}),
    )
    assert any(p.startswith("train.compile: vlmtune does not compile under DeepSpeed") for p in problems)
    assert launch_problems(_recipe(train={"output_dir": "out", "compile": True}), parse_launch_spec({})) == []


def test_under_sharded_parameters_liger_is_refused_and_chunked_needs_a_frozen_head():
    out = {"output_dir": "out"}
    chunked, liger = _recipe(train={**out, "loss": "chunked"}), _recipe(train={**out, "loss": "liger"})
    head = _recipe(train={**out, "loss": "chunked"}, lora={"modules_to_save": ["lm_head"]})
    for accel in (
        {"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 2}},
        {"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 3}},
    ):
        accel = parse_launch_spec(accel)
        assert launch_problems(chunked, accel) == []
        assert [p.split(":")[0] for p in launch_problems(liger, accel)] == ["train.loss"]
        [problem] = launch_problems(head, accel)
        assert problem.startswith("train.loss: chunked under ZeRO-3 / FSDP needs a frozen output head")
        assert "'lm_head'" in problem
    zero2 = parse_launch_spec({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 2}})
    assert launch_problems(liger, zero2) == launch_problems(head, zero2) == []


def test_the_spec_reads_every_shipped_config_once_with_accelerates_defaults():
    from tests.conftest import REPO

    zero2 = parse_launch_spec({"distributed_type": "DEEPSPEED", "deepspeed_config": {}})
    assert (zero2.strategy, zero2.zero_stage, zero2.shards_parameters) == ("deepspeed", 2, False)
    fsdp = parse_launch_spec({"distributed_type": "FSDP", "fsdp_config": {"fsdp_offload_params": True}})
    assert (fsdp.strategy, fsdp.offload_params, fsdp.reshard_after_forward) == ("fsdp2", True, True)
    assert parse_launch_spec({"num_processes": 4}).strategy == "ddp"
    assert parse_launch_spec({}).strategy == "none"
    import yaml

    for path in sorted((REPO / "accelerate_configs").glob("*.yaml")):
        spec = parse_launch_spec(yaml.safe_load(path.read_text()), path=path)
        assert spec.num_processes >= 1 and spec.distributed_type in (
            "NO",
            "MULTI_GPU",
            "MULTI_CPU",
            "DEEPSPEED",
            "FSDP",
        )
