"""The recipe schema: a closed, typed description of one fine-tuning run.

Every section forbids unknown keys, so a typo is an error (with a suggestion, see `load.py`) rather than a
silently ignored setting. Cross-field rules live at the bottom of each model that owns the fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelConfig(_Section):
    path: str = Field(description="Hub id (e.g. Qwen/Qwen2.5-7B-Instruct) or local directory.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Weights dtype.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel; flash_attention_2 needs the flash-attn package and a GPU."
    )
    trust_remote_code: bool = Field(
        False, description="Run code shipped with the model. Off unless you trust it."
    )
    tokenizer_path: str | None = Field(None, description="Tokenizer location when it differs from `path`.")
    chat_template: str | None = Field(
        None, description="Jinja chat template (or a path to a .jinja file) overriding the tokenizer's."
    )
    family: str | None = Field(
        None,
        description="Vision-language model family (e.g. qwen2_5_vl, llava, smolvlm); detected from the model "
        "config when omitted. Text-only models have none.",
    )

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str | None) -> str | None:
        from vlmtune.families import FAMILIES

        if value is not None and value not in FAMILIES:
            raise ValueError(f"unknown model family {value!r}; supported: {', '.join(FAMILIES)}")
        return value


class VisionConfig(_Section):
    """How a vision-language model's vision tower and projector train, and how large its images are."""

    tower: Literal["frozen", "lora", "full"] = Field(
        "frozen",
        description="Vision tower: frozen (no gradients), lora (adapters on its linear layers), full.",
    )
    projector: Literal["frozen", "lora", "full"] = Field(
        "frozen",
        description="Projector between tower and language model: frozen, lora (adapters on its linear layers), "
        "full (trained and saved whole in the adapter).",
    )
    tower_lr: PositiveFloat | None = Field(
        None, description="Learning rate of the vision tower (default train.lr)."
    )
    projector_lr: PositiveFloat | None = Field(
        None, description="Learning rate of the projector (default train.lr)."
    )
    min_pixels: PositiveInt | None = Field(
        None, description="Smallest image area in pixels after resizing (Qwen-VL families)."
    )
    max_pixels: PositiveInt | None = Field(
        None, description="Largest image area in pixels after resizing (Qwen-VL families)."
    )
    longest_edge: PositiveInt | None = Field(
        None, description="Longest image edge in pixels after resizing (Idefics3 / SmolVLM)."
    )

    def image_size(self) -> dict[str, int | None]:
        """The image-size keys as `families.set_image_size` takes them."""
        return {
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "longest_edge": self.longest_edge,
        }


class QuantConfig(_Section):
    bits: Literal[4, 8] = Field(description="4 (QLoRA, NF4/FP4) or 8 (LLM.int8).")
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (NF4 is the QLoRA default).")
    double_quant: bool = Field(
        True, description="Quantise the quantisation constants too (saves ~0.4 bit/param)."
    )
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Dtype the 4-bit weights are dequantised to for matmuls."
    )
    storage_dtype: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8",
        description="Dtype the packed 4-bit weights are stored in; bfloat16 lets ZeRO-3/FSDP shard them.",
    )
    vision: Literal["quantized", "float"] = Field(
        "quantized",
        description="VLMs: `quantized` quantises the vision tower and projector too (bitsandbytes' default); "
        "`float` keeps them unquantised (in fp32 for training, as k-bit preparation upcasts them), which "
        "vision.tower / vision.projector: full need.",
    )


class LoraConfig(_Section):
    r: PositiveInt = Field(16, description="LoRA rank.")
    alpha: PositiveFloat = Field(
        32,
        description="LoRA scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA).",
    )
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="`all-linear`, or module name suffixes such as [q_proj, v_proj]."
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    modules_to_save: list[str] = Field(default_factory=list, description="Modules trained in full and saved.")
    plus_lr_ratio: PositiveFloat | None = Field(
        None,
        description="LoRA+: the B matrices' learning rate as a multiple of A's (the group's lr: train.lr, or the "
        "vision tower / projector lr); e.g. 16. Default: the same rate.",
    )

    @field_validator("target_modules")
    @classmethod
    def _targets_not_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("empty list; use `all-linear` or name at least one module")
        return value


class DataSource(_Section):
    path: str = Field(
        description=".jsonl, .json, .parquet, a directory written by datasets' save_to_disk, a dataset "
        "repository folder (its data files under it), or a Hugging Face hub dataset id (org/name)."
    )
    format: Literal["messages", "sharegpt", "alpaca", "llava", "preference", "prompt"] = Field(
        "messages",
        description="Row layout: messages (role/content), sharegpt (from/value), alpaca (instruction/input/output), "
        "llava (LLaVA JSON: image + conversations with <image>; vision-language models only), preference "
        "(prompt / chosen / rejected, for method: dpo), prompt (a prompt and the fields its rewards read, for "
        "method: grpo).",
    )
    weight: PositiveFloat = Field(
        1.0,
        description="Rows taken per epoch = round(weight × rows): 0.5 takes a seeded half, 2 repeats it twice.",
    )
    split: str | None = Field(
        None,
        description="Split to use when `path` is a DatasetDict on disk, a dataset repository or a hub id "
        "(default there: train).",
    )
    name: str | None = Field(
        None, description="Configuration (subset) of a dataset repository or hub dataset with several."
    )
    revision: str | None = Field(None, description="Hub dataset revision (branch, tag or commit).")
    columns: dict[str, str] | None = Field(
        None,
        description="The format's column names mapped to the source's, e.g. {messages: conversations, images: "
        "image_paths}: each source column is read under the format's name.",
    )
    image_root: str | None = Field(
        None,
        description="Folder that relative image paths start from (default: the data file's folder; relative "
        "to the recipe like every path).",
    )
    image_key: str | None = Field(
        None, description="Column holding a row's images (default: `images`, else `image`)."
    )


class DataConfig(_Section):
    train: list[DataSource] = Field(min_length=1, description="Training sources, mixed by weight.")
    eval: list[DataSource] = Field(
        default_factory=list, description="Evaluation sources (loss and perplexity)."
    )
    max_length: PositiveInt = Field(4096, description="Longest tokenised conversation, in tokens.")
    on_overlength: Literal["drop", "raise", "truncate"] = Field(
        "drop",
        description="Rows longer than max_length: drop (counted), raise (stop with the row), truncate (cut the end).",
    )
    on_bad_row: Literal["raise", "skip"] = Field(
        "raise",
        description="Malformed rows: raise (stop, naming file and row) or skip (counted per problem kind).",
    )
    train_on_prompt: bool = Field(
        False, description="Also train on system/user tokens (default: assistant turns only)."
    )
    max_bad_fraction: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="With on_bad_row: skip, stop if more than this fraction of rows is bad.",
    )
    batching: Literal["padded", "padding_free", "packed"] = Field(
        "padded",
        description="How rows form a micro-batch: padded (rows right-padded to the longest), padding_free (the "
        "micro-batch's rows concatenated into one row, no pad tokens), packed (rows best-fit packed into bins "
        "of data.pack_length tokens; a micro-batch is train.micro_batch_size bins). padding_free and packed "
        "keep sequences apart with position_ids (checked on the loaded model), and for vision-language models "
        "batch the images of all a row's examples in order and give Qwen-VL each example's own 3-D rope "
        "positions; refused for paligemma, gemma3 and mllama, whose masks cannot keep examples apart.",
    )
    pack_length: PositiveInt | None = Field(
        None,
        description="With batching: packed, tokens per bin (default data.max_length; at least max_length).",
    )
    group_by_length: bool = Field(
        False,
        description="With batching: padded, sort rows by length within shuffled windows of 50 micro-batches so "
        "each micro-batch holds rows of similar length (less padding); deterministic per seed and epoch.",
    )
    balance_ranks: bool = Field(
        True,
        description="With several processes, deal each step's rows (or bins) to processes so that their tokens "
        "(image tokens counted again, for the vision tower) are balanced, instead of in order; the step trains "
        "the same rows either way, deterministic per seed and step. Not with group_by_length. The metric "
        "rank_imbalance is the largest process's tokens over the mean.",
    )
    cache: bool = Field(
        True,
        description="Keep the data index (token ids, label masks, lengths; never pixels) across runs, keyed by "
        "the data's bytes, tokenizer / processor, chat template, image settings and row policies (in "
        "$VLMTUNE_CACHE_DIR, default ~/.cache/vlmtune/tokenized). Off: each run indexes into a temporary folder.",
    )
    num_workers: int = Field(
        0,
        ge=0,
        description="Worker processes that collate upcoming steps' micro-batches ahead of the loop (0: in the "
        "loop). Text rows are encoded before training, so 0 is usually right for text; image-text rows decode "
        "their images when collated: use 2 or more for vision-language models.",
    )
    prefetch_factor: PositiveInt = Field(
        2, description="With num_workers > 0, steps each worker prepares ahead."
    )


class EarlyStopping(_Section):
    """`train.early_stopping`: stop once the eval loss has stopped improving (see docs/evaluation.md)."""

    patience: PositiveInt = Field(
        description="Stop after this many evaluations in a row without improvement of the eval loss."
    )
    min_delta: float = Field(
        0.0,
        ge=0.0,
        description="An improvement is an eval loss lower than the best so far by more than this.",
    )


class TrainConfig(_Section):
    output_dir: str = Field(description="Run folder: recipe.yaml, metrics.jsonl, checkpoints/, adapter/.")
    seed: int = Field(42, description="Seeds LoRA init, dropout and the data order.")
    epochs: PositiveFloat = Field(1, description="Passes over the data; ignored when max_steps is set.")
    max_steps: PositiveInt | None = Field(None, description="Optimizer steps; overrides epochs.")
    micro_batch_size: PositiveInt | Literal["auto"] = Field(
        4,
        description="Rows (bins with data.batching: packed) per forward pass per process. auto: the largest "
        "that fits, chosen at start-up by the memory planner for this device (on a GPU confirmed by a few "
        "forward/backward passes at the data's longest rows, stepping down on out-of-memory), at most the rows "
        "one step can use; the choice is logged, written to the run's recipe.yaml and kept on resume.",
    )
    global_batch_size: PositiveInt | None = Field(
        None,
        description="Rows (bins) per optimizer step over all processes. When set, grad_accum is derived: "
        "global_batch_size / (micro_batch_size × processes), which must divide exactly (with micro_batch_size "
        "auto, the largest micro-batch that divides it is chosen). Null: grad_accum as set.",
    )
    micro_batch_tokens: PositiveInt | None = Field(
        None,
        description="Token budget per micro-batch instead of a row count (micro_batch_size is then not used): "
        "padded micro-batches of length-sorted rows with rows × longest ≤ N, or with padding_free one row of "
        "best-fit packed rows ≤ N tokens. The groups are formed once per run, so steps per epoch are fixed; "
        "the loss stays normalised by the window's trained tokens. At least data.max_length; not with packed.",
    )
    grad_accum: PositiveInt = Field(
        4,
        description="Micro-batches per optimizer step; the loss is normalised over the whole window. Derived "
        "from global_batch_size when that is set.",
    )
    lr: PositiveFloat = Field(2.0e-4, description="Peak learning rate.")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_ratio: float = Field(
        0.03, ge=0.0, lt=1.0, description="Fraction of steps with linear warmup from 0."
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay (matrices only).")
    max_grad_norm: float | None = Field(
        1.0, gt=0.0, description="Clip the global gradient norm; null disables."
    )
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw", description="torch AdamW, or bitsandbytes 8-bit / paged 8-bit AdamW."
    )
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: PositiveFloat = Field(1e-8, description="AdamW epsilon.")
    mixed_precision: Literal["bf16", "fp16", "no"] = Field(
        "bf16", description="Autocast dtype; fp16 adds dynamic loss scaling (overflowed steps are skipped)."
    )

    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in backward (non-reentrant)."
    )
    activation_offloading: bool = Field(
        False,
        description="Keep the tensors saved for backward in pinned CPU memory instead of GPU memory (best with "
        "gradient_checkpointing, which leaves one per layer). No effect on CPU.",
    )
    loss: Literal["standard", "chunked", "liger"] = Field(
        "standard",
        description="standard: cross-entropy on the model's full logits; chunked: the output head and cross-entropy "
        "applied to trained tokens only, loss_chunk_tokens at a time with their gradients, so full-vocabulary "
        "logits never exist (same loss to float rounding; under ZeRO-3 / FSDP the head must be frozen); liger: "
        "Liger's fused linear cross-entropy kernel (CUDA, `pip install 'vlmtune[liger]'`, plain unsharded lm_head).",
    )
    loss_chunk_tokens: PositiveInt = Field(
        1024,
        description="With loss chunked: trained tokens per chunk of logits (memory ~ this × vocab × 12 bytes).",
    )
    compile: bool = Field(
        False,
        description="torch.compile each decoder / vision block (the first steps are slower while it compiles; "
        "not with DeepSpeed).",
    )
    nonfinite: Literal["skip", "abort"] = Field(
        "skip",
        description="A NaN/Inf loss or gradient norm: skip the update (counted), or abort with diagnostics.",
    )
    max_nonfinite_in_a_row: PositiveInt = Field(
        5, description="With nonfinite: skip, abort after more than this many non-finite steps in a row."
    )
    log_every: PositiveInt = Field(10, description="Steps between metrics.jsonl / TensorBoard records.")
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps (0: only at the end, if eval data).")
    eval_micro_batch_size: PositiveInt | None = Field(
        None, description="Eval rows per forward pass per process (default micro_batch_size)."
    )
    early_stopping: EarlyStopping | None = Field(
        None, description="Stop when the eval loss stops improving (needs data.eval and eval_every)."
    )
    eval_samples: int = Field(
        0,
        ge=0,
        description="At each evaluation, greedily generate answers to the first N eval prompts (each example's "
        "conversation up to its last assistant turn, images included) into <output_dir>/samples.jsonl "
        "({step, prompt, completion, reference} lines) and TensorBoard / wandb text (needs data.eval).",
    )
    eval_max_new_tokens: PositiveInt = Field(64, description="With eval_samples, longest generated answer.")
    report_to: list[
        Literal[
            "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio"
        ]
    ] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Trackers besides metrics.jsonl (which is always written): tensorboard (<output_dir>/tensorboard), "
        "wandb (<output_dir>/wandb; WANDB_MODE=offline works without network), aim (<output_dir>/.aim), "
        "dvclive (<output_dir>/dvclive), or mlflow, comet_ml, clearml, swanlab, trackio (their own settings).",
    )
    tracker_project: str = Field(
        "vlmtune",
        min_length=1,
        description="Project the run is logged under in trackers that have projects (wandb, mlflow experiment, "
        "comet_ml, clearml, swanlab, trackio); the run is named after output_dir's last folder.",
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _unquoted_no(cls, value):
        return "no" if value is False else value  # YAML 1.1 reads an unquoted `no` as false

    @field_validator("micro_batch_size", mode="wrap")
    @classmethod
    def _count_or_auto(cls, value, handler):
        # One message for a bad value, not one per member of the union.
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("count_or_auto", "expected a positive integer or auto") from None


class CheckpointConfig(_Section):
    every: int = Field(500, ge=0, description="Save every N optimizer steps (0: only at the end).")
    keep_last: PositiveInt = Field(
        3, description="Complete checkpoints kept; older ones go once a newer one is complete."
    )
    resume: str = Field(
        "auto", description="`auto` (newest complete checkpoint), `never`, or a checkpoint path."
    )
    keep_best: bool = Field(
        False,
        description="Save a checkpoint at each evaluation that lowers the best eval loss, and keep the best one "
        "beyond keep_last (needs data.eval).",
    )
    export: Literal["last", "best"] = Field(
        "last",
        description="What adapter/ holds at the end: the last weights, or the best checkpoint's (lowest eval "
        "loss; needs keep_best).",
    )


class DpoConfig(_Section):
    """Direct preference optimisation: the policy against the adapter-disabled base as reference."""

    beta: PositiveFloat = Field(0.1, description="Strength of the implicit KL to the reference (DPO's beta).")
    loss: Literal["sigmoid", "ipo", "simpo"] = Field(
        "sigmoid",
        description="sigmoid (DPO), ipo (IPO's squared loss), simpo (SimPO: length-normalised, reference-free, "
        "with margin gamma).",
    )
    gamma: float = Field(0.5, ge=0.0, description="With loss: simpo, the target reward margin over beta.")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="Assumed share of flipped preference labels (conservative DPO)."
    )


class RewardSpec(_Section):
    """One reward: a built-in by `name`, or the user's `function` (path/to/file.py:func)."""

    name: Literal["format", "accuracy", "iou"] | None = Field(
        None, description="Built-in reward: format, accuracy or iou."
    )
    function: str | None = Field(
        None,
        description="The user's reward, `path/to/file.py:func` (relative to the recipe), called as "
        "func(prompts, completions, **columns) -> list[float | None].",
    )
    weight: float = Field(1.0, description="Weight of this reward in the total.")
    pattern: str | None = Field(
        None,
        description="With name: format, the regex a completion must match (default <think>…</think><answer>…</answer>).",
    )

    @model_validator(mode="after")
    def _one_of(self) -> RewardSpec:
        if (self.name is None) == (self.function is None):
            raise ValueError("give exactly one of `name` (a built-in) or `function` (path/to/file.py:func)")
        if self.pattern is not None and self.name != "format":
            raise ValueError("`pattern` applies to the built-in format reward only")
        return self


class GrpoConfig(_Section):
    """Group relative policy optimisation with rewards computed from the completions (verifiable rewards)."""

    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (a group).")
    max_completion_length: PositiveInt = Field(256, description="Longest completion, in tokens.")
    temperature: PositiveFloat = Field(1.0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling of the rollouts.")
    beta: float = Field(
        0.0,
        ge=0.0,
        description="KL to the reference (the adapter-disabled base); 0 skips the reference pass.",
    )
    epsilon: PositiveFloat = Field(0.2, description="Lower clipping range of the importance ratio.")
    epsilon_high: PositiveFloat | None = Field(
        None, description="Upper clipping range (default epsilon; larger is DAPO's clip-higher)."
    )
    loss: Literal["grpo", "dapo", "dr_grpo"] = Field(
        "dapo",
        description="Token-loss normalisation: grpo (mean per completion, then over completions), dapo (over all "
        "completion tokens of the step), dr_grpo (over completions × max_completion_length).",
    )
    scale_rewards: bool = Field(
        True, description="Divide advantages by the group's reward standard deviation (off: Dr. GRPO)."
    )
    steps_per_generation: PositiveInt = Field(
        1,
        description="Optimizer steps that share one generation of rollouts (later steps use importance ratios "
        "against the generating policy); they draw the same prompts, so an epoch has this many times the steps.",
    )
    rewards: list[RewardSpec] = Field(
        min_length=1, description="Reward functions, summed with their weights."
    )
    log_rollouts: int = Field(
        0, ge=0, description="Write <output_dir>/rollouts/step-N.jsonl every N steps (0: never)."
    )
    gather_for_generation: bool = Field(
        True,
        description="ZeRO-3 only: gather the whole model on every GPU once per generation (fast; needs room for "
        "the full weights on each GPU, which `vlmtune plan` counts). false generates with the layers gathered one "
        "by one at every token (slow, for models whose weights do not fit one GPU).",
    )


class DistillConfig(_Section):
    """Knowledge distillation from a frozen teacher sharing the student's vocabulary."""

    teacher: str = Field(description="Teacher model: hub id or local directory.")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Teacher weights dtype.")
    quant: QuantConfig | None = Field(None, description="Load the teacher quantised (bitsandbytes).")
    temperature: PositiveFloat = Field(1.0, description="Softmax temperature of both distributions.")
    alpha: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Weight of the distillation term against the labels' cross-entropy (1: teacher only).",
    )
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="Divergence between teacher and student: forward_kl, reverse_kl or jsd."
    )


class LaunchConfig(_Section):
    accelerate_config: str | None = Field(
        None,
        description="Accelerate config file (relative to the recipe); its DeepSpeed/FSDP sections apply.",
    )


class Recipe(_Section):
    method: Literal["sft", "dpo", "grpo", "distill"] = Field(
        "sft",
        description="Training method: sft (supervised), dpo (preference pairs), grpo (RL with verifiable "
        "rewards), distill (from a teacher). Its section (dpo:, grpo:, distill:) configures it.",
    )
    dpo: DpoConfig | None = None
    grpo: GrpoConfig | None = None
    distill: DistillConfig | None = None
    model: ModelConfig
    quant: QuantConfig | None = None
    lora: LoraConfig = Field(default_factory=LoraConfig)
    vision: VisionConfig = Field(default_factory=VisionConfig)
    data: DataConfig
    train: TrainConfig
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)

    # Folder of the recipe file: relative paths that do not exist from the working directory are tried here.
    _base_dir: Path | None = PrivateAttr(None)
