"""Ask a causal LM (optionally with a LoRA adapter) a few questions and print its greedy answers.

Used to show what fine-tuning changed: run it on the base model, then with the adapter, on the same questions.
Runs on CPU in float32 and never contacts the Hugging Face Hub.

    python scripts/ask.py MODEL_DIR [--adapter ADAPTER_DIR] [--questions data/demo/questions.txt]
    python scripts/ask.py MODEL_DIR -q "What is the capital of Talvessa?" -q "Who invented the tide clock?"
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_QUESTIONS = Path(__file__).resolve().parents[1] / "data" / "demo" / "questions.txt"


def read_questions(path: Path) -> list[str]:
    """Non-empty lines of `path`, skipping `#` comments."""
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir", type=Path, help="local model directory (config, safetensors, tokenizer)")
    parser.add_argument("--adapter", type=Path, help="PEFT adapter directory to apply on top of the model")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--questions", type=Path, help=f"file with one question per line (default: {DEFAULT_QUESTIONS})"
    )
    source.add_argument("-q", "--question", action="append", dest="inline", help="a question (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)

    questions = args.inline or read_questions(args.questions or DEFAULT_QUESTIONS)
    if not questions:
        parser.error("no questions given")

    # Before importing transformers: only local files, ever.
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if tokenizer.chat_template is None:
        print(f"error: the tokenizer in {args.model_dir} has no chat template", file=sys.stderr)
        return 2
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    if args.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()

    # A fresh config rather than the model's: shipped configs often carry sampling defaults (temperature,
    # top_p) that would contradict greedy decoding and trigger warnings.
    eos = tokenizer.eos_token_id
    generation = GenerationConfig(
        do_sample=False,
        max_new_tokens=args.max_new_tokens,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
    )
    for question in questions:
        input_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=generation,
            )
        answer = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip()
        print(f"Q: {question}\nA: {answer}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
