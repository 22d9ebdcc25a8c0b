"""Entry point: `accelerate launch -m vlmtune.train RECIPE [key=value ...]`, and `run()` for notebooks.

The order follows the data flow: recipe → checks → accelerator → data (cheap errors first) → model + LoRA →
loop → checkpoints → adapter.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vlmtune.errors import (
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    EXIT_USER_ERROR,
    Preempted,
    RecipeError,
    TrainingDiverged,
    UserError,
)
from vlmtune.exit_report import report_exit_code
from vlmtune.layout import ADAPTER_DIR, METRICS_FILE, RECIPE_FILE, SAMPLES_FILE
from vlmtune.logging import get_logger, is_main_process

log = get_logger()


@dataclass
class RunResult:
    """What a finished run produced: its folders, the final metrics and the number of optimizer steps."""

    output_dir: Path
    adapter_dir: Path
    metrics_file: Path
    metrics: dict = field(default_factory=dict)
    steps: int = 0

    @property
    def history(self) -> list[dict]:
        """Every record of metrics.jsonl (train records have `loss`, eval records `eval_loss`), oldest first."""
        from vlmtune.engine.metrics import read_metrics

        return read_metrics(self.metrics_file)


def run(recipe, overrides: list[str] | dict | None = None, *, on_trainer=None) -> RunResult:
    """Train the recipe (a path, a mapping or a `Recipe`) and return the run's paths and final metrics.

    `on_trainer(trainer)`, when given, is called with the built `Trainer` just before training (`vlmtune profile`
    instruments its steps there).

    Raises:
        UserError: for problems in the recipe, data or environment (the message says what and where).
        Preempted: stopped on request (signal or STOP file) after saving a checkpoint; run again to resume.
        TrainingDiverged: non-finite losses or gradients beyond what `train.nonfinite` allows.
    """
    from vlmtune.config.load import dump_recipe
    from vlmtune.config.prepare import prepare

    # Recipe and environment first: a typo fails in a second, before torch and the model are loaded.
    prepared = prepare(recipe, overrides)
    for warning in prepared.warnings:
        log.warning("%s", warning)
    recipe, launch = prepared.recipe, prepared.launch
    t, base = recipe.train, recipe._base_dir

    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import set_seed

    from vlmtune.checkpoint.export import export_adapter, export_checkpoint_adapter
    from vlmtune.checkpoint.manager import CheckpointManager, check_free_space
    from vlmtune.config.rules import family_problems
    from vlmtune.data.batching import build_collator, build_sampler, method_collator
    from vlmtune.data.packing import check_packed_attention
    from vlmtune.engine.accelerator import STEP_TIMEOUT, build_accelerator
    from vlmtune.engine.distributed import check_sharding, configure_ddp, set_collective_timeout
    from vlmtune.engine.loop import Components, Trainer
    from vlmtune.engine.metrics import MetricsWriter
    from vlmtune.engine.optim import build_optimizer, build_scheduler
    from vlmtune.engine.vision_sync import keep_vision_in_step
    from vlmtune.methods import MethodContext, build_method
    from vlmtune.model.load import load_model, load_processor, load_tokenizer, model_family
    from vlmtune.model.lora import apply_lora

    # A notebook may run several recipes in one process: start each from a clean accelerate state.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = build_accelerator(recipe, launch)
    try:
        out = Path(t.output_dir).expanduser().resolve()
        set_seed(t.seed)

        # A vision-language model (its family known from the recipe or the model config) reads images through
        # its processor; a text model's processor is its tokenizer.
        family = model_family(recipe.model, base)
        if problems := family_problems(recipe, family):  # `prepare` knew the family only from a local config
            raise RecipeError(problems)
        if family is None:
            processor = load_tokenizer(recipe.model, base)
            pad_token_id = processor.pad_token_id
        else:
            log.info("vision-language model family %s", family.name)
            processor = load_processor(recipe.model, family, recipe.vision, base)
            pad_token_id = processor.tokenizer.pad_token_id
        # The method's padded collator (pairs for dpo, left-padded prompts for grpo): it also batches eval.
        padded = method_collator(recipe, pad_token_id, family)
        train_data, eval_data = _build_data(
            recipe, processor, family, show_progress=accelerator.is_main_process
        )

        model = load_model(
            recipe.model, recipe.quant, device=accelerator.device, base_dir=base, family=family
        )
        model = apply_lora(
            model,
            recipe.lora,
            quantized=recipe.quant is not None,
            gradient_checkpointing=t.gradient_checkpointing,
            family=family,
            vision=recipe.vision,
        )
        if t.compile:
            from vlmtune.model.compile import compile_blocks

            compile_blocks(model)
        train_collator = build_collator(
            recipe, padded, pad_token_id, family=family, model_config=model.config
        )
        recipe = _batch_sizes(recipe, launch, accelerator, model, train_data, train_collator)
        t = recipe.train
        optimizer = build_optimizer(
            model, t, family=family, vision=recipe.vision, plus_lr_ratio=recipe.lora.plus_lr_ratio
        )
        configure_ddp(accelerator, model)
        model, optimizer = accelerator.prepare(model, optimizer)
        check_sharding(accelerator, model, launch)
        vision_inputs = keep_vision_in_step(accelerator, model, family, train_data, padded)
        set_collective_timeout(accelerator, STEP_TIMEOUT)

        if recipe.data.batching != "padded":
            vocab = len(getattr(processor, "tokenizer", processor))  # a VLM's processor holds its tokenizer
            check_packed_attention(model, train_collator, vocab, accelerator.device, recipe.data.batching)
        sampler = build_sampler(
            recipe, train_data.lengths, accelerator.num_processes, image_tokens=train_data.image_tokens()
        )
        total_steps = t.max_steps or max(1, math.ceil(t.epochs * sampler.steps_per_epoch))
        scheduler = build_scheduler(optimizer, t, total_steps)
        log.info(
            "%d steps (%d per epoch), global batch %d = %d micro × %d accum × %d processes",
            total_steps, sampler.steps_per_epoch, sampler.global_batch,
            t.micro_batch_size, t.grad_accum, accelerator.num_processes,
        )  # fmt: skip

        context = MethodContext(recipe, accelerator, model, processor, family, out, vision_inputs)
        method = build_method(context)
        checkpoints = CheckpointManager(
            out,
            accelerator,
            keep_last=recipe.checkpoint.keep_last,
            method=method,
            keep_best=recipe.checkpoint.keep_best,
        )
        resume_from = checkpoints.resume_point(recipe.checkpoint.resume, base)

        samples = None
        if t.eval_samples and eval_data is not None:
            from vlmtune.engine.samples import SampleWriter

            tokenizer = getattr(processor, "tokenizer", processor)  # a VLM's processor holds its tokenizer
            samples = SampleWriter(
                accelerator, eval_data, padded, tokenizer, out / SAMPLES_FILE,
                count=t.eval_samples, max_new_tokens=t.eval_max_new_tokens,
            )  # fmt: skip
        components = Components(
            recipe=recipe, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
            sampler=sampler, train_data=train_data, eval_data=eval_data,
            train_collator=train_collator, eval_collator=padded, family=family, output_dir=out,
            checkpoints=checkpoints, metrics=MetricsWriter(out / METRICS_FILE, accelerator), method=method,
            samples=samples,
        )  # fmt: skip
        trainer = Trainer(components, total_steps=total_steps)
        if resume_from is not None:
            trainer.resume(resume_from)
        # Only now, with data, model and checkpoint known good, is anything written: a rejected run leaves the
        # folder as it was.
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            check_free_space(out, model, recipe.checkpoint.keep_last + int(recipe.checkpoint.keep_best))
            dump_recipe(recipe, out / RECIPE_FILE)
        accelerator.wait_for_everyone()
        if t.report_to:
            accelerator.init_trackers(t.tracker_project, config=_flat(recipe.model_dump(mode="json")))
        if on_trainer is not None:
            on_trainer(trainer)
        final = trainer.fit()

        adapter_dir = out / ADAPTER_DIR
        best = checkpoints.best(trainer.state) if recipe.checkpoint.export == "best" else None
        if recipe.checkpoint.export == "best" and best is None:
            log.warning(
                "checkpoint.export: best, but no checkpoint of a best eval loss exists; exporting the last"
            )
        if best is not None:
            export_checkpoint_adapter(accelerator, best, processor, adapter_dir)
            log.info("adapter of the best checkpoint, %s, written to %s", best.name, adapter_dir)
        else:
            export_adapter(accelerator, model, processor, adapter_dir)
            log.info("adapter written to %s", adapter_dir)
        return RunResult(out, adapter_dir, out / METRICS_FILE, final, trainer.state.step)
    finally:
        accelerator.end_training()


def _batch_sizes(recipe, launch, accelerator, model, train_data, collator):
    """The recipe with the batch sizes this run trains with (`train.micro_batch_size: auto` sized for the device,
    `train.global_batch_size` met), logged and handed to the accelerator before `prepare`."""
    from vlmtune.engine.accelerator import set_batch_sizes
    from vlmtune.plan.autobatch import device_memory, resolve_batch
    from vlmtune.plan.probe import cuda_probe, min_over_ranks

    t, device, probe = recipe.train, accelerator.device, None
    # The probe measures the unwrapped model: right for one process and DDP, not for sharded weights.
    if t.micro_batch_size == "auto" and device.type == "cuda" and not (launch.deepspeed or launch.fsdp):
        probe = cuda_probe(recipe, model, train_data, collator, accelerator.autocast, device)
    recipe, choice = resolve_batch(
        recipe, world=accelerator.num_processes, rows=len(train_data), memory=device_memory(device),
        probe=probe, agree=min_over_ranks(device),
    )  # fmt: skip
    if t.micro_batch_size == "auto" or t.global_batch_size is not None:
        log.info(
            "batch sizes: train.micro_batch_size=%d train.grad_accum=%d (%s)",
            choice.micro_batch_size, choice.grad_accum, choice.how,
        )  # fmt: skip
    set_batch_sizes(accelerator, choice.micro_batch_size, choice.grad_accum)
    return recipe


def _build_data(recipe, processor, family, *, show_progress: bool):
    """The indexed train and (optional) eval datasets; data problems surface before the model is loaded.

    `processor` is a text model's tokenizer, or a VLM's processor (`family` given).
    """
    from vlmtune.data import build_dataset

    def build(sources, split):
        data = build_dataset(
            sources, recipe.data, processor, family=family, seed=recipe.train.seed, base_dir=recipe._base_dir,
            show_progress=show_progress,
        )  # fmt: skip
        log.info("%s data: %s", split, data.stats.summary())
        return data

    return build(recipe.data.train, "train"), build(recipe.data.eval, "eval") if recipe.data.eval else None


def _flat(d: dict, prefix: str = "") -> dict:
    """TensorBoard hparams take scalars only: flatten the recipe, stringify lists and None."""
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flat(v, key + "."))
        else:
            flat[key] = v if isinstance(v, int | float | str | bool) else str(v)
    return flat


def main(argv: list[str] | None = None) -> int:
    code = _main(sys.argv[1:] if argv is None else argv)
    report_exit_code(code)
    return code


USAGE = """usage: accelerate launch -m vlmtune.train RECIPE.yaml [section.key=value ...]
       python -m vlmtune.train RECIPE.yaml [section.key=value ...]     (one process)

Train a recipe; run the same command again to resume from the newest complete checkpoint.

examples:
  accelerate launch -m vlmtune.train recipes/7b_lora.yaml
  accelerate launch -m vlmtune.train recipes/7b_lora.yaml train.lr=1e-4 lora.r=8
  python -m vlmtune.train recipes/demo/tiny_lora.yaml train.max_steps=10

Exit codes: 0 done, 2 bad recipe / data / environment, 3 diverged, 75 stopped on request (rerun to resume),
130 interrupted. Recipe keys: docs/recipe.md."""


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else EXIT_USER_ERROR
    try:
        result = run(argv[0], argv[1:])
    except UserError as exc:
        if is_main_process():
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingDiverged as exc:
        if is_main_process():
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except Preempted as exc:
        if is_main_process():
            print(f"preempted: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        if is_main_process():
            print(
                "\ninterrupted: run the same command again to resume from the newest complete checkpoint",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED
    log.info("done: %d steps; adapter in %s", result.steps, result.adapter_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
