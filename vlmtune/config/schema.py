"""The recipe schema: a closed, typed description of one fine-tuning run.

Every section forbids unknown keys, so a typo is an error (with a suggestion, see `load.py`) rather than a
silently ignored setting. Cross-field rules live at the bottom of each model that owns the fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, PrivateAttr, field_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelConfig(_Section):
    path: str = Field(description="Hub id (e.g. Qwen/Qwen2.5-7B-Instruct) or local directory.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Weights dtype.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = Field(
        False, description="Run code shipped with the model. Off unless you trust it."
    )
    tokenizer_path: str | None = Field(None, description="Tokenizer location when it differs from `path`.")
    chat_template: str | None = Field(
        None, description="Jinja chat template (or a path to a .jinja file) overriding the tokenizer's."
    )


class QuantConfig(_Section):
    bits: Literal[4, 8] = Field(description="4 (QLoRA, NF4/FP4) or 8 (LLM.int8).")
    type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    storage_dtype: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8",
        description="Dtype the packed 4-bit weights are stored in; bfloat16 lets ZeRO-3/FSDP shard them.",
    )


class LoraConfig(_Section):
    r: PositiveInt = 16
    alpha: PositiveFloat = 32
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="`all-linear`, or module name suffixes such as [q_proj, v_proj]."
    )
    use_dora: bool = False
    use_rslora: bool = False
    modules_to_save: list[str] = Field(default_factory=list, description="Modules trained in full and saved.")

    @field_validator("target_modules")
    @classmethod
    def _targets_not_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("empty list; use `all-linear` or name at least one module")
        return value


class DataSource(_Section):
    path: str = Field(
        description=".jsonl, .json, .parquet, or a directory written by datasets' save_to_disk."
    )
    format: Literal["messages", "sharegpt", "alpaca"] = "messages"
    weight: PositiveFloat = Field(
        1.0,
        description="Rows taken per epoch = round(weight × rows): 0.5 takes a seeded half, 2 repeats it twice.",
    )
    split: str | None = Field(None, description="Split to use when `path` is a DatasetDict on disk.")


class DataConfig(_Section):
    train: list[DataSource] = Field(min_length=1)
    eval: list[DataSource] = Field(default_factory=list)
    max_length: PositiveInt = 4096
    on_overlength: Literal["drop", "raise", "truncate"] = "drop"
    on_bad_row: Literal["raise", "skip"] = "raise"
    train_on_prompt: bool = False
    max_bad_fraction: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="With on_bad_row: skip, stop if more than this fraction of rows is bad.",
    )


class TrainConfig(_Section):
    output_dir: str
    seed: int = 42
    epochs: PositiveFloat = Field(1, description="Passes over the data; ignored when max_steps is set.")
    max_steps: PositiveInt | None = Field(None, description="Optimizer steps; overrides epochs.")
    micro_batch_size: PositiveInt = 4
    grad_accum: PositiveInt = 4
    lr: PositiveFloat = 2.0e-4
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(
        1.0, gt=0.0, description="Clip the global gradient norm; null disables."
    )
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: PositiveFloat = 1e-8
    mixed_precision: Literal["bf16", "fp16", "no"] = "bf16"
    gradient_checkpointing: bool = True
    log_every: PositiveInt = 10
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps (0: only at the end, if eval data).")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"]
    )


class CheckpointConfig(_Section):
    every: int = Field(500, ge=0, description="Save every N optimizer steps (0: only at the end).")
    keep_last: PositiveInt = 3
    resume: str = Field(
        "auto", description="`auto` (newest complete checkpoint), `never`, or a checkpoint path."
    )


class LaunchConfig(_Section):
    accelerate_config: str | None = Field(
        None,
        description="Accelerate config file (relative to the recipe); its DeepSpeed/FSDP sections apply.",
    )


class Recipe(_Section):
    model: ModelConfig
    quant: QuantConfig | None = None
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig
    train: TrainConfig
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)

    # Folder of the recipe file: relative paths that do not exist from the working directory are tried here.
    _base_dir: Path | None = PrivateAttr(None)
