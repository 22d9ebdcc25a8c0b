"""The `vlmtune` console script.

vlmtune validate RECIPE [key=value ...]   check a recipe without loading weights
vlmtune train RECIPE [key=value ...]      same as `python -m vlmtune.train` (one process)
"""

from __future__ import annotations

import argparse
import sys

from vlmtune.errors import EXIT_USER_ERROR, RecipeError, UserError


def _validate(args: argparse.Namespace) -> int:
    from vlmtune.config.checks import environment_problems, load_accelerate_config
    from vlmtune.config.load import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    problems = environment_problems(recipe)
    if problems:
        raise RecipeError(problems, source=args.recipe)
    accel = load_accelerate_config(recipe)
    t = recipe.train
    quant = (
        f"{recipe.quant.bits}-bit {recipe.quant.type if recipe.quant.bits == 4 else ''}".strip()
        if recipe.quant
        else "none"
    )
    print(f"ok: {args.recipe}")
    print(f"  model      {recipe.model.path} ({recipe.model.dtype}, quant {quant})")
    print(f"  lora       r={recipe.lora.r} alpha={recipe.lora.alpha} targets={recipe.lora.target_modules}")
    print(
        f"  data       {len(recipe.data.train)} train source(s), {len(recipe.data.eval)} eval, max_length {recipe.data.max_length}"
    )
    print(
        f"  batch      {t.micro_batch_size} micro × {t.grad_accum} accum per process, lr {t.lr} ({t.scheduler})"
    )
    print(
        f"  launch     {recipe.launch.accelerate_config or 'defaults'} ({accel.get('distributed_type', 'NO')})"
    )
    print(f"  output     {t.output_dir}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from vlmtune.train import main as train_main

    return train_main([args.recipe, *args.overrides])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmtune", description="LoRA / QLoRA fine-tuning of LLMs and VLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (
        (
            "validate",
            _validate,
            "check a recipe (schema, files, packages, output dir) without loading weights",
        ),
        (
            "train",
            _train,
            "train a recipe in this process (use `accelerate launch -m vlmtune.train` for many)",
        ),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("recipe", help="recipe YAML file")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-4")
        p.set_defaults(fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
