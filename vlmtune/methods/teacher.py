"""The teacher of `method: distill`: checked against the student, loaded like it, frozen and sharded like it."""

from __future__ import annotations

import copy

from torch import nn

from vlmtune.config.schema import DistillConfig
from vlmtune.engine.distributed import strategy, zero_stage
from vlmtune.engine.loss import is_sharded, unwrap
from vlmtune.errors import UserError, first_line
from vlmtune.logging import get_logger

log = get_logger(__name__)


def check_vocabulary(student_tokenizer, teacher_location: str, *, trust_remote_code: bool = False) -> None:
    """The teacher's tokenizer must map every token to the same id as the student's.

    Raises:
        UserError: the teacher ships no loadable tokenizer, or its vocabulary differs (with an example).
    """
    from transformers import AutoTokenizer

    try:
        theirs = AutoTokenizer.from_pretrained(teacher_location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"distill.teacher: cannot load a tokenizer from {teacher_location} ({first_line(exc)}); the teacher "
            "must ship the tokenizer it shares with the student so its vocabulary can be checked"
        ) from None
    ours, theirs = student_tokenizer.get_vocab(), theirs.get_vocab()
    if ours == theirs:
        return
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    example = differ[0]
    raise UserError(
        f"distill.teacher: {teacher_location} does not share the student's tokenizer vocabulary "
        f"({len(ours)} vs {len(theirs)} tokens, {len(differ)} differ; e.g. {example!r} is "
        f"{ours.get(example)} for the student and {theirs.get(example)} for the teacher). Distillation compares "
        "next-token distributions id by id: pick a teacher of the same model family and tokenizer"
    )


def prepare_teacher(accelerator, teacher: nn.Module) -> nn.Module:
    """The teacher frozen, in eval mode, and sharded like the student.

    ZeRO-3: a DeepSpeed engine without optimizer (its weights were partitioned at load under zero.Init), so its
    forward gathers layer by layer as the student's does. FSDP2: `fully_shard` with the run's plugin. Otherwise
    (one process, DDP, ZeRO-1/2) a whole replica on the device: it has no gradients to shard.
    """
    teacher.requires_grad_(False)
    teacher.eval()
    kind = strategy(accelerator)
    if kind == "deepspeed" and zero_stage(accelerator) == 3:
        import deepspeed

        config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        # Inference only: without these DeepSpeed would build an optimizer (or its offload) for no parameters.
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        config["zero_optimization"].pop("offload_optimizer", None)
        teacher, *_ = deepspeed.initialize(model=teacher, config=config)
    elif kind == "fsdp2":
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        teacher = fsdp2_prepare_model(accelerator, teacher)
    elif not any(is_sharded(p) for p in teacher.parameters()):
        teacher = teacher.to(accelerator.device) if not getattr(teacher, "hf_device_map", None) else teacher
    teacher.eval()
    return teacher


def load_teacher(ctx) -> nn.Module:
    """The teacher of a `methods.MethodContext`'s recipe, checked (vocabulary, kind), loaded and prepared.

    Raises:
        UserError: the teacher cannot be loaded, has another vocabulary, or is not of the student's kind.
    """
    from vlmtune.model.load import DTYPES, load_model, model_family, model_location

    recipe, base = ctx.recipe, ctx.recipe._base_dir
    cfg: DistillConfig = recipe.distill
    teacher_model = recipe.model.model_copy(
        update={"path": cfg.teacher, "dtype": cfg.dtype, "revision": None, "tokenizer_path": None,
                "chat_template": None, "family": None}
    )  # fmt: skip
    where = model_location(teacher_model, base)
    tokenizer = getattr(ctx.processor, "tokenizer", ctx.processor)
    check_vocabulary(tokenizer, where, trust_remote_code=recipe.model.trust_remote_code)
    family = model_family(teacher_model, base)
    student = ctx.family.name if ctx.family is not None else None
    theirs = family.name if family is not None else None
    if student != theirs:
        raise UserError(
            f"distill.teacher: {where} is {'a ' + theirs + ' vision-language' if theirs else 'a text'} model and "
            f"the student {'a ' + student + ' vision-language' if student else 'a text'} model; the teacher reads "
            "the student's inputs, so it must be of the same kind (and, for images, the same family)"
        )
    teacher = load_model(
        teacher_model, cfg.quant, device=ctx.accelerator.device, base_dir=base, family=family
    )
    teacher = prepare_teacher(ctx.accelerator, teacher)
    sharded = any(is_sharded(p) for p in teacher.parameters())
    if sharded and ctx.vision_inputs is not None:
        # Its layers are gathered as they run, like the student's: on a text-only batch it must run its vision
        # tower too, or the processes' collectives stop pairing up.
        from vlmtune.engine.vision_sync import VisionKeepAlive

        dtype = DTYPES[cfg.dtype]
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ctx.vision_inputs.items()}
        VisionKeepAlive(unwrap(teacher), inputs)
        log.info("distill: the teacher runs its vision tower on text-only batches too")
    hf = unwrap(teacher)  # as loaded, not as asked: the log shows what bitsandbytes did
    bits = (
        4 if getattr(hf, "is_loaded_in_4bit", False) else 8 if getattr(hf, "is_loaded_in_8bit", False) else 0
    )
    log.info(
        "distill: teacher %s (%s, %s, %s), loss %s at temperature %g, alpha %g",
        where, type(unwrap(teacher)).__name__,
        f"{bits}-bit, {DTYPES[cfg.dtype]}" if bits else DTYPES[cfg.dtype],
        "sharded like the student" if sharded else "a whole copy per process",
        cfg.loss, cfg.temperature, cfg.alpha,
    )  # fmt: skip
    return teacher
