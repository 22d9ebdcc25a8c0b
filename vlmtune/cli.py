"""The `vlmtune` console script.

vlmtune --version
vlmtune validate RECIPE [key=value ...]   check a recipe without loading weights
vlmtune train RECIPE [key=value ...]      same as `python -m vlmtune.train` (one process)
vlmtune data-check RECIPE [key=value ...] [--show N]   scan all data: problems, lengths, what training would do
vlmtune plan RECIPE [key=value ...] [--gpus N] [--gpu-mem-gib 80] [--json]
                                          per-GPU memory estimate from the model config: does it fit?
vlmtune launch RECIPE [key=value ...] [--nodes N --node-rank R --main-ip IP ...]
                                          `accelerate launch` composed from the recipe, for one node or many
vlmtune merge SOURCE --out DIR            fold a trained adapter into its base model (a standalone model folder)
vlmtune generate SOURCE --prompt TEXT     one answer from a trained adapter (or a merged model)
vlmtune chat SOURCE                       a conversation on stdin with a trained adapter (or a merged model)
"""

from __future__ import annotations

import argparse
import sys

from vlmtune.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError


def _validate(args: argparse.Namespace) -> int:
    from vlmtune.config.prepare import prepare

    prepared = prepare(args.recipe, args.overrides)
    for warning in prepared.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    recipe, launch = prepared.recipe, prepared.launch
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
    print(f"  launch     {recipe.launch.accelerate_config or 'defaults'} ({launch.distributed_type})")
    print(f"  output     {t.output_dir}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vlmtune.config.load import load_recipe
    from vlmtune.data.check import format_report, render_example, scan, verdict, write_problems
    from vlmtune.model.load import load_processor, load_tokenizer, model_family

    recipe = load_recipe(args.recipe, args.overrides)
    family = model_family(recipe.model, recipe._base_dir)
    if family is None:
        processor = tokenizer = load_tokenizer(recipe.model, recipe._base_dir)
        image_ids: set[int] = set()
    else:  # a vision-language model: its processor reads the images
        processor = load_processor(recipe.model, family, recipe.vision, recipe._base_dir)
        tokenizer, image_ids = processor.tokenizer, set(family.image_token_ids(processor.tokenizer))
    reports = scan(recipe, processor, family=family)
    print(format_report(recipe, reports))
    path = Path(args.bad_rows or Path(recipe.train.output_dir).expanduser() / "data-check" / "bad_rows.jsonl")
    n = write_problems(reports, path)
    if n:
        print(f"problem rows: {path} ({n})")
    train = next((r.dataset for r in reports if r.name == "train" and r.dataset), None)
    for i in range(min(args.show, len(train) if train else 0)):
        print(f"\n--- train example {i} ({train.lengths[i]} tokens; trained tokens marked) ---")
        print(render_example(train[i], tokenizer, image_ids=image_ids))
    failures = verdict(recipe, reports)
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    if not failures:
        print("ok: training would accept this data")
    return EXIT_USER_ERROR if failures else 0


def _plan(args: argparse.Namespace) -> int:
    import json

    from vlmtune.config.load import load_recipe
    from vlmtune.plan import format_plan, plan_json, plan_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    plan = plan_recipe(recipe, gpus=args.gpus, gpu_mem_gib=args.gpu_mem_gib)
    print(json.dumps(plan_json(plan), indent=2) if args.json else format_plan(plan))
    return 0


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def _train(args: argparse.Namespace) -> int:
    from vlmtune.train import main as train_main

    return train_main([args.recipe, *args.overrides])


def _launch(args: argparse.Namespace) -> int:
    from vlmtune.launch import format_plan, plan_launch, run_plan

    plan = plan_launch(
        args.recipe, args.overrides, nodes=args.nodes, node_rank=args.node_rank, main_ip=args.main_ip,
        main_port=args.main_port, procs_per_node=args.procs_per_node,
    )  # fmt: skip
    print(format_plan(plan), file=sys.stderr)
    return 0 if args.dry_run else run_plan(plan)


def _merge(args: argparse.Namespace) -> int:
    from vlmtune.checkpoint.merge import merge
    from vlmtune.checkpoint.source import resolve_source

    source = resolve_source(args.source, base=args.base, trust_remote_code=args.trust_remote_code)
    dtype = args.dtype or (source.recipe.model.dtype if source.recipe else "bfloat16")
    result = merge(source, args.out, dtype=dtype, force=args.force)
    for note in result.notes:
        print(f"note: {note}")
    print(f"merged model ({result.model_class}, {dtype}) written to {result.out}")
    return 0


def _generator(args: argparse.Namespace, images: tuple[str, ...] | list[str] = ()):
    """The loaded model, the sampling settings and the opened images (checked before the model loads)."""
    from vlmtune.checkpoint.source import resolve_source
    from vlmtune.infer import Generator, Sampling, open_image

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    source = resolve_source(args.source, base=args.base, trust_remote_code=args.trust_remote_code)
    opened = [open_image(path, source) for path in images]
    return Generator(source, dtype=args.dtype, device=args.device), sampling, opened


def _generate(args: argparse.Namespace) -> int:
    from vlmtune.infer import generate

    generator, sampling, images = _generator(args, args.image)
    print(generate(generator, args.prompt, images=images, system=args.system, sampling=sampling))
    return 0


def _chat(args: argparse.Namespace) -> int:
    from vlmtune.infer import chat

    generator, sampling, _ = _generator(args)
    try:
        return chat(generator, sys.stdin, sys.stdout, sys.stderr, system=args.system, sampling=sampling)
    except KeyboardInterrupt:  # Ctrl-C ends a conversation; no traceback
        print(file=sys.stderr)
        return EXIT_INTERRUPTED


SOURCE_HELP = (
    "a run folder (train.output_dir), its adapter/, a checkpoints/step-N/ folder, or (generate, chat) a "
    "merged model"
)
# Each subcommand's --help ends with these examples.
EXAMPLES = {
    "merge": """examples:
  vlmtune merge runs/7b_lora --out runs/7b_lora/merged                   # the run's final adapter
  vlmtune merge runs/7b_lora/checkpoints/step-500 --out merged-500 --dtype float16
  vlmtune merge my-adapter/ --base Qwen/Qwen2.5-7B-Instruct --out merged --force

The base model is --base, else the run's recipe.yaml (model.path), else base_model_name_or_path of
adapter_config.json. The result loads with transformers' from_pretrained (AutoModelForCausalLM, or for a
vision-language model its family's class, e.g. AutoModelForImageTextToText). A QLoRA adapter is merged into the
base loaded unquantised.
""",
    "generate": """examples:
  vlmtune generate runs/7b_lora --prompt "What is the capital of Talvessa?"
  vlmtune generate runs/qwen2_5_vl_lora --prompt "What is in this picture?" --image cat.png
  vlmtune generate runs/7b_lora/merged --prompt "Hello" --temperature 0.7 --seed 0

Greedy decoding unless --temperature is above 0; only the new text is printed.
""",
    "chat": """examples:
  vlmtune chat runs/7b_lora --system "You are terse."
  printf '/image cat.png\\nWhat is this?\\nAnd its colour?\\n' | vlmtune chat runs/qwen2_5_vl_lora

Each line is a user message, or a command: /image PATH attaches an image to the next message, /reset starts a
new conversation, /exit ends it (so does the end of input). Answers go to stdout, one per message; prompts and
notices to stderr.
""",
    "validate": """examples:
  vlmtune validate recipes/7b_lora.yaml                       # schema, files, packages, output dir
  vlmtune validate recipes/7b_lora.yaml train.lr=1e-4 lora.r=8   # overrides are validated too

Exit code 0 when the recipe is valid, 2 with every problem listed (file and key) when it is not.
""",
    "train": """examples:
  vlmtune train recipes/demo/tiny_lora.yaml                   # one process (CPU, or one GPU)
  vlmtune train recipes/7b_lora.yaml train.max_steps=1000     # with overrides
  accelerate launch -m vlmtune.train recipes/7b_lora.yaml     # several processes: the same run under accelerate

Running the same command again resumes from the newest complete checkpoint (checkpoint.resume: auto).
Exit codes: 0 done, 2 bad recipe / data / environment, 3 diverged, 75 stopped on request (rerun to resume).
""",
    "data-check": """examples:
  vlmtune data-check recipes/7b_lora.yaml                     # problems per kind and token lengths
  vlmtune data-check recipes/7b_lora.yaml --show 3            # and 3 examples, trained tokens marked ⟦…⟧
  vlmtune data-check recipes/7b_lora.yaml data.max_length=2048 --bad-rows /tmp/bad.jsonl

Exit code 2 when training would stop on this data.
""",
    "plan": """examples:
  vlmtune plan recipes/7b_lora.yaml                          # the recipe's accelerate config, 80 GiB GPUs
  vlmtune plan recipes/7b_qlora.yaml --gpu-mem-gib 24        # a 24 GiB GPU
  vlmtune plan recipes/7b_lora.yaml launch.accelerate_config=accelerate_configs/zero3.yaml --gpus 8
  vlmtune plan recipes/7b_lora.yaml train.micro_batch_size=8 --json

Reads only the model's config.json (a local folder, or a hub id in the cache); builds nothing on a GPU.
""",
    "launch": """examples:
  vlmtune launch recipes/7b_lora.yaml                       # this node, the recipe's accelerate config
  vlmtune launch recipes/7b_lora.yaml --procs-per-node 4    # 4 GPUs of this node
  vlmtune launch recipes/7b_lora.yaml --nodes 2 --node-rank 1 --main-ip 10.0.0.1   # on the second of two nodes
  vlmtune launch recipes/7b_lora.yaml --dry-run             # print the command only

SIGTERM / SIGUSR1 to this command make the run checkpoint at the next step and exit 75 (resume: run it again).
""",
}


def _add_model_options(p: argparse.ArgumentParser, *, generating: bool) -> None:
    p.add_argument("source", help=SOURCE_HELP)
    p.add_argument(
        "--base", help="base model folder or hub id (default: the run's recipe, else the adapter config)"
    )
    dtype_default = (
        "float32 on CPU, bfloat16 on a GPU" if generating else "the recipe's model.dtype, else bfloat16"
    )
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        help=f"weights dtype (default: {dtype_default})",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run code shipped with the model (also on when the run's recipe set model.trust_remote_code)",
    )
    if generating:
        p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the first GPU, else the CPU)")
        p.add_argument("--system", help="system prompt")
        p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="most tokens to generate")
        p.add_argument(
            "--temperature",
            type=float,
            default=0.0,
            metavar="T",
            help="0 (default): greedy; above 0: sampling",
        )
        p.add_argument(
            "--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling (with --temperature)"
        )
        p.add_argument("--seed", type=int, help="seed of sampling (with --temperature)")


MAIN_EXAMPLES = """examples:
  vlmtune validate recipes/demo/tiny_lora.yaml
  vlmtune train recipes/demo/tiny_lora.yaml train.max_steps=10
  vlmtune launch recipes/7b_lora.yaml --procs-per-node 8

`vlmtune COMMAND --help` shows each command's options and examples. Recipe keys: docs/recipe.md.
"""


def build_parser() -> argparse.ArgumentParser:
    from vlmtune import __version__

    parser = argparse.ArgumentParser(
        prog="vlmtune",
        description="LoRA / QLoRA fine-tuning of LLMs and VLMs.",
        epilog=MAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vlmtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help_, description=help_, epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip

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
        p = add(name, help_)
        p.add_argument("recipe", help="recipe YAML file")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-4")
        p.set_defaults(fn=fn)
    p = add(
        "data-check", "scan all of a recipe's data: problems per kind, token lengths, what training would do"
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument(
        "--show", type=int, default=0, metavar="N", help="print N training examples, trained tokens marked"
    )
    p.add_argument(
        "--bad-rows", help="where to write the problem rows (default <output_dir>/data-check/bad_rows.jsonl)"
    )
    p.set_defaults(fn=_data_check)
    p = add(
        "plan",
        "estimate per-GPU memory from the model config (weights, LoRA, optimizer, activations): does it fit?",
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.micro_batch_size=8")
    p.add_argument(
        "--gpus", type=_positive(int), help="processes (GPUs) in the job (default: the accelerate config's)"
    )
    p.add_argument(
        "--gpu-mem-gib", type=_positive(float), default=80.0, help="memory of one GPU in GiB (default 80)"
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(fn=_plan)
    p = add("launch", "start the recipe with `accelerate launch` on this node (one of --nodes)")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-4")
    p.add_argument(
        "--nodes", type=int, help="machines in the job (default: the accelerate config's num_machines)"
    )
    p.add_argument("--node-rank", type=int, default=0, help="this machine's rank, 0 on the main node")
    p.add_argument("--main-ip", help="address of the rank-0 node (required with --nodes > 1)")
    p.add_argument("--main-port", type=int, help="rendezvous port on the rank-0 node (default 29500)")
    p.add_argument(
        "--procs-per-node",
        type=int,
        help="processes (GPUs) per node (default: from the config or visible GPUs)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the launch command and exit")
    p.set_defaults(fn=_launch)

    p = add("merge", "fold a trained adapter into its base model")
    _add_model_options(p, generating=False)
    p.add_argument("--out", required=True, help="folder to write the merged model to (must be empty or new)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(fn=_merge)
    p = add("generate", "answer one prompt with a trained adapter (or a merged model)")
    _add_model_options(p, generating=True)
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="an image for a VLM (repeatable, in order)",
    )
    p.set_defaults(fn=_generate)
    p = add("chat", "a multi-turn conversation on stdin with a trained adapter (or a merged model)")
    _add_model_options(p, generating=True)
    p.set_defaults(fn=_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow the options (`vlmtune launch r.yaml --nodes 2 train.lr=1e-4`).
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
