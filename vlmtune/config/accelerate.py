"""The recipe's accelerate config file (`launch.accelerate_config`), parsed once into a typed `LaunchSpec`.

Runtime (`engine.accelerator`, `engine.distributed`), the checks, `vlmtune launch`, `vlmtune plan`, the notebook
launcher and the CLI all read the spec; nothing else opens the file or reads its keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vlmtune.config.paths import resolve_path
from vlmtune.config.schema import Recipe
from vlmtune.errors import UserError

ACCELERATE_DISTRIBUTED_TYPES = ("NO", "MULTI_GPU", "MULTI_CPU", "DEEPSPEED", "FSDP")

# What is in effect: one process, plain DDP, DeepSpeed ZeRO or FSDP2.
Strategy = Literal["none", "ddp", "deepspeed", "fsdp2"]

# accelerate config file `fsdp_config` keys (without their `fsdp_` prefix) → FullyShardedDataParallelPlugin fields.
FSDP_KEYS = {
    "version": "fsdp_version", "offload_params": "cpu_offload",
    "transformer_layer_cls_to_wrap": "transformer_cls_names_to_wrap",
    **{k: k for k in (
        "reshard_after_forward", "auto_wrap_policy", "state_dict_type", "cpu_ram_efficient_loading",
        "activation_checkpointing", "sync_module_states", "use_orig_params", "forward_prefetch",
        "backward_prefetch", "sharding_strategy", "min_num_params",
    )},
}  # fmt: skip


@dataclass(frozen=True)
class LaunchSpec:
    """What the accelerate config asks for. The defaults are accelerate's for a file that says nothing.

    Attributes:
        distributed_type: accelerate's name (NO, MULTI_GPU, MULTI_CPU, DEEPSPEED or FSDP).
        num_processes: processes in the whole job (all machines).
        num_machines: machines (nodes) in the job.
        mixed_precision: the file's own value (the recipe's `train.mixed_precision` decides; kept for messages).
        use_cpu: the file asks for CPU training.
        zero_stage: the DeepSpeed ZeRO stage (0 when not DeepSpeed).
        offload_optimizer_device: where ZeRO keeps the optimizer state (`none`: on the GPU; `cpu`, `nvme`).
        offload_param_device: where ZeRO keeps the parameters.
        zero3_init: DeepSpeed's `zero3_init_flag` (build the model already partitioned).
        deepspeed_config_file: a DeepSpeed JSON file that replaces the `deepspeed_config` keys, resolved.
        fsdp_config: the `fsdp_config` mapping as written (keys with or without their `fsdp_` prefix).
        path: the file, resolved; None when the recipe names none.
    """

    distributed_type: str = "NO"
    num_processes: int = 1
    num_machines: int = 1
    mixed_precision: str | None = None
    use_cpu: bool = False
    zero_stage: int = 0
    offload_optimizer_device: str = "none"
    offload_param_device: str = "none"
    zero3_init: bool = False
    deepspeed_config_file: Path | None = None
    fsdp_config: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def deepspeed(self) -> bool:
        return self.distributed_type == "DEEPSPEED"

    @property
    def fsdp(self) -> bool:
        return self.distributed_type == "FSDP"

    @property
    def strategy(self) -> Strategy:
        """The sharding asked for; `ddp` for any multi-process config that names no sharding."""
        if self.deepspeed:
            return "deepspeed"
        if self.fsdp:
            return "fsdp2"
        return "ddp" if self.num_processes > 1 else "none"

    @property
    def shards_parameters(self) -> bool:
        """The weights themselves are split over ranks (ZeRO-3, FSDP): each rank holds a slice of every layer."""
        return self.fsdp or (self.deepspeed and self.zero_stage == 3)

    @property
    def offload_optimizer(self) -> bool:
        return self.offload_optimizer_device != "none"

    @property
    def offload_params(self) -> bool:
        """ZeRO or FSDP keeps the parameters off the GPU."""
        return self.offload_param_device != "none" or bool(self.fsdp_option("offload_params", False))

    @property
    def reshard_after_forward(self) -> bool:
        return bool(self.fsdp_option("reshard_after_forward", True))

    def fsdp_option(self, key: str, default: Any = None) -> Any:
        """An `fsdp_config` value, written with or without its `fsdp_` prefix."""
        return self.fsdp_config.get(f"fsdp_{key}", self.fsdp_config.get(key, default))


def load_launch_spec(recipe: Recipe) -> LaunchSpec:
    """The recipe's accelerate config as a `LaunchSpec` (the defaults when the recipe names none).

    Raises:
        UserError: the file is missing, not a YAML mapping, names an unknown distributed_type, or its DeepSpeed
            JSON file cannot be read.
    """
    name = recipe.launch.accelerate_config
    if not name:
        return LaunchSpec()
    base = recipe._base_dir
    path = resolve_path(name, base)
    if not path.is_file():
        raise UserError(
            f"launch.accelerate_config: file not found: {name} (looked in {Path.cwd()}"
            + (f" and {base}" if base else "")
            + "); the shipped ones are in accelerate_configs/"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"launch.accelerate_config: {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"launch.accelerate_config: {path} must be a mapping")
    return parse_launch_spec(data, base_dir=base, path=path.resolve())


def parse_launch_spec(data: dict, *, base_dir: Path | None = None, path: Path | None = None) -> LaunchSpec:
    """A `LaunchSpec` from an accelerate config mapping (see `load_launch_spec`)."""
    where = f"launch.accelerate_config: {path}: " if path else "launch.accelerate_config: "
    dist = str(data.get("distributed_type", "NO"))
    if dist not in ACCELERATE_DISTRIBUTED_TYPES:
        raise UserError(
            f"{where}distributed_type {dist!r} is not one of {', '.join(ACCELERATE_DISTRIBUTED_TYPES)}"
        )
    ds = dict(data.get("deepspeed_config") or {}) if dist == "DEEPSPEED" else {}
    ds_file = resolve_path(ds["deepspeed_config_file"], base_dir) if ds.get("deepspeed_config_file") else None
    if ds_file is not None:
        zero = _deepspeed_json(ds["deepspeed_config_file"], ds_file).get("zero_optimization") or {}
        stage = int(zero.get("stage", 0))
        offload = {p: (zero.get(f"offload_{p}") or {}).get("device", "none") for p in ("optimizer", "param")}
    else:
        stage = int(ds.get("zero_stage", 2)) if dist == "DEEPSPEED" else 0
        offload = {p: ds.get(f"offload_{p}_device", "none") for p in ("optimizer", "param")}
    fsdp = dict(data.get("fsdp_config") or {}) if dist == "FSDP" else {}
    return LaunchSpec(
        distributed_type=dist,
        num_processes=int(data.get("num_processes") or 1),
        num_machines=int(data.get("num_machines") or 1),
        mixed_precision=data.get("mixed_precision"),
        use_cpu=bool(data.get("use_cpu")),
        zero_stage=stage,
        offload_optimizer_device=str(offload["optimizer"] or "none"),
        offload_param_device=str(offload["param"] or "none"),
        zero3_init=bool(ds.get("zero3_init_flag", False)),
        deepspeed_config_file=ds_file,
        fsdp_config=fsdp,
        path=path,
    )


def _deepspeed_json(name: str, path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(
            f"launch.accelerate_config: deepspeed_config_file {name} cannot be read as JSON ({exc})"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"launch.accelerate_config: deepspeed_config_file {name} must hold a JSON object")
    return data


def fsdp_problems(spec: LaunchSpec) -> list[str]:
    """Keys of `fsdp_config` that vlmtune does not know, and FSDP versions other than 2."""
    if not spec.fsdp:
        return []
    problems = []
    for key in spec.fsdp_config:
        if key.removeprefix("fsdp_") not in FSDP_KEYS:
            known = ", ".join(sorted("fsdp_" + k for k in FSDP_KEYS))
            problems.append(f"launch.accelerate_config: unknown fsdp_config key {key!r} (known: {known})")
    version = spec.fsdp_option("version", 2)
    if str(version) != "2":
        problems.append(
            f"launch.accelerate_config: fsdp_version {version}: vlmtune supports FSDP2 only; set fsdp_version: 2"
        )
    return problems


def launch_problems(recipe: Recipe, spec: LaunchSpec) -> list[str]:
    """Recipe settings that the sharding of `spec` cannot run (no package probes: see `config.environment`)."""
    problems = fsdp_problems(spec)
    if spec.deepspeed and recipe.train.compile:
        problems.append(
            "train.compile: vlmtune does not compile under DeepSpeed (its ZeRO hooks gather parameters around "
            "each module, which torch.compile graphs do not see); set train.compile: false, or use DDP / FSDP"
        )
    q = recipe.quant
    if spec.shards_parameters and recipe.train.loss == "liger":
        problems.append(
            "train.loss: liger needs the whole output head on every GPU, which ZeRO-3 / FSDP parameter sharding "
            "splits; use train.loss: chunked (it gathers the head), or DDP / ZeRO-2"
        )
    targets = recipe.lora.target_modules if isinstance(recipe.lora.target_modules, list) else []
    head_trains = [m for m in recipe.lora.modules_to_save + targets if "lm_head" in m]
    if spec.shards_parameters and recipe.train.loss == "chunked" and head_trains:
        problems.append(
            f"train.loss: chunked under ZeRO-3 / FSDP needs a frozen output head, and the recipe trains "
            f"{head_trains[0]!r} (lora.modules_to_save / target_modules); use train.loss: standard, or DDP / ZeRO-2"
        )
    if q is not None and spec.shards_parameters:
        if q.bits == 8:
            problems.append(
                "quant.bits: 8-bit weights cannot be sharded by ZeRO-3 / FSDP; use 4-bit with "
                "quant.storage_dtype bfloat16, or ZeRO-2 / DDP"
            )
        elif q.storage_dtype != recipe.model.dtype:
            problems.append(
                f"quant.storage_dtype: ZeRO-3 / FSDP shard 4-bit weights only when they are stored in the "
                f"model's float dtype; set quant.storage_dtype: {recipe.model.dtype} (now {q.storage_dtype})"
            )
    return problems
