"""Entry point: `accelerate launch -m vlmtune.train RECIPE [key=value ...]`, and `run()` for notebooks.

The order follows the data flow: recipe → checks → accelerator → data (cheap errors first) → model + LoRA →
loop → checkpoints → adapter.
"""

from __future__ import annotations

import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vlmtune.errors import EXIT_USER_ERROR, RecipeError, UserError
from vlmtune.logging import get_logger

log = get_logger()


@dataclass
class RunResult:
    """What a finished run produced."""

    output_dir: Path
    adapter_dir: Path
    metrics_file: Path
    metrics: dict = field(default_factory=dict)
    steps: int = 0


def run(recipe, overrides: list[str] | dict | None = None) -> RunResult:
    """Train the recipe (a path, a mapping or a `Recipe`) and return the run's paths and final metrics.

    Raises:
        UserError: for problems in the recipe, data or environment (the message says what and where).
    """
    from vlmtune.config.checks import environment_problems, load_accelerate_config
    from vlmtune.config.load import dump_recipe, load_recipe
    from vlmtune.config.schema import Recipe

    # Recipe and environment first: a typo fails in a second, before torch and the model are loaded.
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
    problems = environment_problems(recipe)
    if problems:
        raise RecipeError(problems)
    accel_cfg = load_accelerate_config(recipe)
    t, base = recipe.train, recipe._base_dir

    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import set_seed

    from vlmtune.checkpoint.export import replace_dir, save_adapter
    from vlmtune.checkpoint.manager import CheckpointManager
    from vlmtune.config.checks import resolve_path
    from vlmtune.data import Collator, build_dataset
    from vlmtune.engine.accelerator import build_accelerator
    from vlmtune.engine.loop import Components, Trainer
    from vlmtune.engine.metrics import MetricsWriter
    from vlmtune.engine.optim import build_optimizer, build_scheduler
    from vlmtune.model.load import load_model, load_tokenizer
    from vlmtune.model.lora import apply_lora

    # A notebook may run several recipes in one process: start each from a clean accelerate state.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = build_accelerator(recipe, accel_cfg)
    try:
        out = Path(t.output_dir).expanduser().resolve()
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            dump_recipe(recipe, out / "recipe.yaml")
        accelerator.wait_for_everyone()
        set_seed(t.seed)

        tokenizer = load_tokenizer(recipe.model, base)
        main = accelerator.is_main_process
        train_data = build_dataset(
            recipe.data.train, recipe.data, tokenizer, seed=t.seed, base_dir=base, show_progress=main
        )
        log.info("train data: %s", train_data.stats.summary())
        eval_data = None
        if recipe.data.eval:
            eval_data = build_dataset(
                recipe.data.eval, recipe.data, tokenizer, seed=t.seed, base_dir=base, show_progress=main
            )
            log.info("eval data: %s", eval_data.stats.summary())
        if len(train_data) == 0:
            raise UserError("data.train: no usable rows after filtering; see the counts above")

        model = load_model(recipe.model, recipe.quant, device=accelerator.device, base_dir=base)
        model = apply_lora(
            model,
            recipe.lora,
            quantized=recipe.quant is not None,
            gradient_checkpointing=t.gradient_checkpointing,
        )
        optimizer = build_optimizer(model, t)
        model, optimizer = accelerator.prepare(model, optimizer)

        global_batch = t.micro_batch_size * t.grad_accum * accelerator.num_processes
        steps_per_epoch = math.ceil(len(train_data) / global_batch)
        total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
        scheduler = build_scheduler(optimizer, t, total_steps)

        checkpoints = CheckpointManager(out, accelerator, keep_last=recipe.checkpoint.keep_last)
        resume_from = None
        if recipe.checkpoint.resume == "auto":
            resume_from = checkpoints.latest()
        elif recipe.checkpoint.resume != "never":
            resume_from = resolve_path(recipe.checkpoint.resume, base)

        if t.report_to:
            accelerator.init_trackers("tensorboard", config=_flat(recipe.model_dump(mode="json")))
        log.info(
            "%d steps (%d per epoch), global batch %d = %d micro × %d accum × %d processes",
            total_steps,
            steps_per_epoch,
            global_batch,
            t.micro_batch_size,
            t.grad_accum,
            accelerator.num_processes,
        )
        collator = Collator(pad_token_id=tokenizer.pad_token_id)
        trainer = Trainer(
            Components(
                recipe=recipe,
                accelerator=accelerator,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                train_data=train_data,
                eval_data=eval_data,
                collator=collator,
                checkpoints=checkpoints,
                metrics=MetricsWriter(out / "metrics.jsonl", accelerator),
            ),
            total_steps=total_steps,
        )
        final = trainer.fit(resume_from=resume_from)

        adapter_dir = out / "adapter"
        if accelerator.is_main_process:
            staging = out / "adapter.partial"
            if staging.exists():
                shutil.rmtree(staging)
            save_adapter(accelerator.unwrap_model(model), staging)
            tokenizer.save_pretrained(str(staging))
            replace_dir(staging, adapter_dir)
            log.info("adapter written to %s", adapter_dir)
        accelerator.wait_for_everyone()
        return RunResult(out, adapter_dir, out / "metrics.jsonl", final, trainer.state.step)
    finally:
        accelerator.end_training()


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
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: accelerate launch -m vlmtune.train RECIPE.yaml [section.key=value ...]")
        return 0 if argv else EXIT_USER_ERROR
    try:
        result = run(argv[0], argv[1:])
    except UserError as exc:
        from vlmtune.logging import is_main_process

        if is_main_process():
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    log.info("done: %d steps; adapter in %s", result.steps, result.adapter_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
