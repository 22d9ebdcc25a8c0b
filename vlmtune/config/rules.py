"""Rules that span several recipe fields: combinations of valid values that cannot work together.

They need only the recipe (and, for `family_problems`, the model family: from `model.family`, or detected from
the model's config.json by `config.environment`, or by `train` once the config is loaded).
"""

from __future__ import annotations

from vlmtune.config.schema import Recipe, VisionConfig
from vlmtune.families import FAMILIES, Family


def recipe_warnings(recipe: Recipe) -> list[str]:
    """Allowed but risky settings, each as `key.path: why`; logged by `train` and printed by `validate`."""
    warnings = []
    m = recipe.model
    t = recipe.train
    if t.activation_offloading and not t.gradient_checkpointing:
        warnings.append(
            "train.activation_offloading: without gradient_checkpointing every activation is copied to the CPU "
            "and back in each step, which is slow; set train.gradient_checkpointing: true"
        )
    if m.trust_remote_code and not m.revision:
        warnings.append(
            "model.trust_remote_code: true runs Python code from the model repository, and with no model.revision "
            "pinned that code can change between runs; pin a commit hash in model.revision"
        )
    every, max_steps = recipe.checkpoint.every, t.max_steps
    if every and max_steps and every > max_steps:
        # A short run is normal (a smoke test, a first look); the final checkpoint is written all the same.
        warnings.append(
            f"checkpoint.every: {every} is more than train.max_steps ({max_steps}), so only the final "
            "checkpoint is written"
        )
    return warnings


def cross_field_problems(recipe: Recipe) -> list[str]:
    """Combinations of valid values that cannot work together, each as `key.path: reason`."""
    t, q, lora = recipe.train, recipe.quant, recipe.lora
    problems = []
    if t.mixed_precision == "fp16" and recipe.model.dtype == "bfloat16":
        problems.append(
            "train.mixed_precision: fp16 with model.dtype bfloat16 mixes two half types; "
            "use mixed_precision bf16, or model.dtype float16/float32"
        )
    if t.mixed_precision == "bf16" and recipe.model.dtype == "float16":
        problems.append("train.mixed_precision: bf16 with model.dtype float16; use model.dtype bfloat16")
    if q is not None and q.bits == 8 and lora.use_dora:
        problems.append(
            "lora.use_dora: DoRA on 8-bit weights is not supported by peft; use quant.bits 4 or no quant"
        )
    if t.eval_every > 0 and not recipe.data.eval:
        problems.append("train.eval_every: evaluation is scheduled but data.eval lists no source")
    family = FAMILIES.get(recipe.model.family) if recipe.model.family else None
    problems += method_problems(recipe) + batching_problems(recipe) + vision_problems(recipe)
    problems += evaluation_problems(recipe)
    return problems + (family_problems(recipe, family) if family is not None else [])


# The data format each method reads; sft and distill read conversations.
METHOD_FORMATS = {"dpo": ("preference",), "grpo": ("prompt",)}
CONVERSATION_FORMATS = ("messages", "sharegpt", "alpaca", "llava")


def method_problems(recipe: Recipe) -> list[str]:
    """`method:` and its section agree, and every data source is in a format the method reads."""
    problems = []
    for other in ("dpo", "grpo", "distill"):
        if getattr(recipe, other) is not None and other != recipe.method:
            problems.append(
                f"{other}: this section configures method {other}, but the recipe's method is {recipe.method}; "
                f"set method: {other}, or remove the {other}: section"
            )
    if recipe.method in ("grpo", "distill") and getattr(recipe, recipe.method) is None:
        needs = "at least its rewards" if recipe.method == "grpo" else "at least its teacher"
        problems.append(f"{recipe.method}: method {recipe.method} needs a {recipe.method}: section ({needs})")
    if (
        recipe.method == "dpo"
        and recipe.dpo is not None
        and recipe.dpo.loss == "ipo"
        and recipe.dpo.label_smoothing
    ):
        problems.append(
            "dpo.label_smoothing: the ipo loss has no label smoothing (it is for sigmoid and simpo); "
            "remove dpo.label_smoothing, or set dpo.loss: sigmoid"
        )
    if recipe.method != "sft" and recipe.train.loss == "liger":
        problems.append(
            f"train.loss: liger is the sft loss's kernel; method {recipe.method} computes its own loss in chunks "
            "over the sequence (never the full logits); remove train.loss"
        )
    formats = METHOD_FORMATS.get(recipe.method, CONVERSATION_FORMATS)
    for split in ("train", "eval"):
        for i, source in enumerate(getattr(recipe.data, split)):
            if source.format not in formats:
                problems.append(
                    f"data.{split}.{i}.format: {source.format} rows cannot train method {recipe.method}; "
                    f"it reads {' or '.join(formats)}"
                )
    return problems


def evaluation_problems(recipe: Recipe) -> list[str]:
    """Early stopping, the best checkpoint and sample answers all read evaluations: data.eval must exist."""
    t, ck, problems = recipe.train, recipe.checkpoint, []
    no_eval = not recipe.data.eval
    if t.early_stopping is not None and (no_eval or t.eval_every == 0):
        problems.append(
            "train.early_stopping: it watches the eval loss, which "
            + (
                "needs eval data: add data.eval"
                if no_eval
                else "train.eval_every: 0 measures only at the end"
            )
            + "; set data.eval and train.eval_every (e.g. 100), or remove train.early_stopping"
        )
    if ck.keep_best and no_eval:
        problems.append(
            "checkpoint.keep_best: the best checkpoint is the one with the lowest eval loss, and data.eval lists "
            "no source; add data.eval, or remove checkpoint.keep_best"
        )
    if ck.export == "best" and not ck.keep_best:
        problems.append(
            "checkpoint.export: best exports the best checkpoint's adapter, which only checkpoint.keep_best: true "
            "keeps; set checkpoint.keep_best: true, or checkpoint.export: last"
        )
    if t.eval_samples and no_eval:
        problems.append(
            "train.eval_samples: answers are generated for eval prompts, and data.eval lists none"
        )
    if t.eval_samples and recipe.method not in ("sft", "distill"):
        problems.append(
            f"train.eval_samples: sample answers are generated from conversations (methods sft and distill), not "
            f"for method {recipe.method}; remove train.eval_samples"
        )
    return problems


def family_problems(recipe: Recipe, family: Family | None) -> list[str]:
    """What the model's kind refuses: image settings for a text model (`family` None); packing and other
    families' image-size keys for a vision-language model."""
    if family is None:
        return _text_model_problems(recipe)
    problems = image_size_problems(recipe, family)
    if problem := vlm_packing_problem(recipe.data.batching, family):
        problems.append(problem)
    return problems


def _text_model_problems(recipe: Recipe) -> list[str]:
    """Image settings in a recipe for a text-only model are a mistake, not something to ignore."""
    problems = []
    if recipe.vision != VisionConfig():
        problems.append("vision: the model is not a vision-language model, so it has no vision settings")
    for split in ("train", "eval"):
        for i, src in enumerate(getattr(recipe.data, split)):
            for key in ("image_root", "image_key"):
                if getattr(src, key) is not None:
                    problems.append(f"data.{split}.{i}.{key}: the model is not a vision-language model")
            if src.format == "llava":
                problems.append(f"data.{split}.{i}.format: llava needs a vision-language model")
    return problems


def vlm_packing_problem(batching: str, family: Family) -> str | None:
    """Why `data.batching` (padding_free / packed) cannot be used with this vision-language family; None when it
    can. The reason lives in the family registry (`Family.packing_refused`)."""
    if batching == "padded" or not family.packing_refused:
        return None
    return (
        f"data.batching: {batching} is not supported for {family.name} models: {family.packing_refused}; use "
        "data.batching: padded (data.group_by_length and train.micro_batch_tokens also cut padding)"
    )


def batching_problems(recipe: Recipe) -> list[str]:
    """Rules of `data.batching`, `data.pack_length`, `data.group_by_length`, `train.micro_batch_tokens` and the
    batch sizes."""
    d, t, problems = recipe.data, recipe.train, []
    if d.pack_length is not None and d.batching != "packed":
        problems.append(
            f"data.pack_length: only used with data.batching: packed (now {d.batching}); remove it or pack"
        )
    if d.pack_length is not None and d.pack_length < d.max_length:
        problems.append(
            f"data.pack_length: {d.pack_length} is less than data.max_length ({d.max_length}), so the longest "
            "rows would fit no bin; raise pack_length or lower max_length"
        )
    if d.group_by_length and d.batching != "padded":
        problems.append(
            f"data.group_by_length: groups rows to cut padding, and data.batching {d.batching} has none; "
            "remove group_by_length"
        )
    if t.micro_batch_tokens is not None:
        if t.micro_batch_size == "auto":
            problems.append(
                "train.micro_batch_size: auto sizes a row count, and train.micro_batch_tokens replaces the row "
                "count with a token budget; remove one of them"
            )
        if t.global_batch_size is not None:
            problems.append(
                "train.global_batch_size: counts rows, and train.micro_batch_tokens micro-batches hold a varying "
                "number of rows; set train.grad_accum instead"
            )
        if d.batching == "packed":
            problems.append(
                "train.micro_batch_tokens: with data.batching: packed a micro-batch is train.micro_batch_size "
                "bins of data.pack_length tokens; set those instead"
            )
        if d.group_by_length:
            problems.append(
                "data.group_by_length: token-budget micro-batches (train.micro_batch_tokens) are already "
                "grouped by length; remove group_by_length"
            )
        if t.micro_batch_tokens < d.max_length:
            problems.append(
                f"train.micro_batch_tokens: {t.micro_batch_tokens} is less than data.max_length "
                f"({d.max_length}), so the longest rows would fit no micro-batch; raise it or lower max_length"
            )
    return problems + _method_batching_problems(recipe)


# What a micro-batch of each method counts (train.micro_batch_size), for the messages.
_METHOD_UNITS = {"dpo": "preference pairs (each two rows, chosen and rejected)", "grpo": "prompts"}


def _method_batching_problems(recipe: Recipe) -> list[str]:
    """DPO and GRPO batch whole pairs or prompts, padded: never packed, cut by tokens, or trained on prompts."""
    d, t, method = recipe.data, recipe.train, recipe.method
    unit = _METHOD_UNITS.get(method)
    if unit is None:
        return []
    problems = []
    if d.batching != "padded":
        problems.append(
            f"data.batching: method {method} needs data.batching: padded (now {d.batching}): its micro-batch "
            f"is train.micro_batch_size {unit}, padded; set data.batching: padded"
        )
    if t.micro_batch_tokens is not None:
        problems.append(
            f"train.micro_batch_tokens: method {method} counts a micro-batch in {unit}, not tokens; remove "
            "train.micro_batch_tokens and set train.micro_batch_size (data.group_by_length cuts padding)"
        )
    if d.train_on_prompt:
        trained = "the chosen and rejected replies" if method == "dpo" else "the generated completions"
        problems.append(
            f"data.train_on_prompt: method {method} scores {trained} only, never the prompt; remove "
            "data.train_on_prompt"
        )
    return problems


def vision_problems(recipe: Recipe) -> list[str]:
    """Rules of the `vision` section that hold for every model."""
    v, problems = recipe.vision, []
    for part in ("tower", "projector"):
        if getattr(v, part) == "frozen" and getattr(v, f"{part}_lr") is not None:
            problems.append(
                f"vision.{part}_lr: the {part} is frozen (vision.{part}: frozen), so it has no learning rate; "
                f"set vision.{part} to lora or full, or remove vision.{part}_lr"
            )
    if v.min_pixels and v.max_pixels and v.min_pixels > v.max_pixels:
        problems.append(f"vision.min_pixels: {v.min_pixels} is more than vision.max_pixels ({v.max_pixels})")
    if recipe.quant is not None and recipe.quant.vision == "quantized" and "full" in (v.tower, v.projector):
        part = "tower" if v.tower == "full" else "projector"
        problems.append(
            f"vision.{part}: full training of a quantised {part} is not possible; set quant.vision: float "
            "(keeps the tower and projector unquantised), or train it with lora"
        )
    return problems


def image_size_problems(recipe: Recipe, family: Family) -> list[str]:
    """Image-size keys of the recipe that `family` does not take."""
    problems = []
    for key, value in recipe.vision.image_size().items():
        if value is not None and key not in family.size_keys:
            takes = ", ".join(f"vision.{k}" for k in family.size_keys) or "none: the vision config fixes it"
            problems.append(
                f"vision.{key}: not an image-size setting of {family.name} models (image-size keys: {takes})"
            )
    return problems
