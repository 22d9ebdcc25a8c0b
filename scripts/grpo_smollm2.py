"""GRPO on the real SmolLM2-135M-Instruct with arithmetic prompts, on CPU: the reward rises, and the adapter,
loaded with plain transformers + peft, does better than the base model on held-out prompts.

Rewards (all can move on this model): the built-in `accuracy` (the answer, as a number, against `solution`), the
built-in `format` with a pattern this model can meet ("the number only": a strict <think>/<answer> format is
almost never written by a 135M model at temperature 1, so every group has zero variance and nothing is learnt),
and `brevity` below (1 for four words or fewer).

    python scripts/prepare_smollm2.py runs/models/smollm2-135m         # once
    python scripts/grpo_smollm2.py runs/models/smollm2-135m runs/grpo_smollm2 [--steps 30]

Prints the reward per step and a JSON summary (first and last steps' mean reward; held-out accuracy and format
rate of base and adapter, greedy decoding).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

INSTRUCTION = "Reply with the number only."
NUMBER_ONLY = r"^\s*-?\d+\s*\.?\s*$"


def brevity(prompts, completions, **columns) -> list[float]:
    """1 for a reply of at most four words, else 0 (a GRPO reward, TRL's convention)."""
    return [1.0 if len(_text(c).split()) <= 4 else 0.0 for c in completions]


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def recipe(model: Path, out: Path, data: Path, steps: int) -> dict:
    return {
        "model": {"path": str(model), "dtype": "float32"},
        "method": "grpo",
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"train": [{"path": str(data), "format": "prompt"}], "max_length": 256, "batching": "padded"},
        "train": {
            "output_dir": str(out), "micro_batch_size": 2, "grad_accum": 1, "lr": 5.0e-4, "max_steps": steps,
            "warmup_ratio": 0.0, "scheduler": "constant", "mixed_precision": "no", "gradient_checkpointing": False,
            "log_every": 1, "report_to": [], "seed": 0,
        },
        "checkpoint": {"every": 0, "keep_last": 1},
        "grpo": {
            "num_generations": 4, "max_completion_length": 24, "temperature": 1.0, "beta": 0.0, "loss": "dapo",
            "rewards": [
                {"name": "accuracy"},
                {"name": "format", "pattern": NUMBER_ONLY, "weight": 0.5},
                {"function": f"{Path(__file__).resolve()}:brevity", "weight": 0.5},
            ],
            "log_rollouts": 10,
        },
        "launch": {"accelerate_config": str(Path(__file__).resolve().parents[1] / "accelerate_configs/cpu.yaml")},
    }  # fmt: skip


def held_out(model_dir: Path, adapter: Path | None, rows: list[dict]) -> dict[str, float]:
    """Greedy answers of the base model (adapter None) or the adapter, with plain transformers + peft."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    correct = formatted = 0
    for start in range(0, len(rows), 8):
        chunk = rows[start : start + 8]
        enc = tok.apply_chat_template(
            [[{"role": "user", "content": r["prompt"]}] for r in chunk],
            add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True,
        )  # fmt: skip
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        for row, ids in zip(chunk, out[:, enc["input_ids"].shape[1] :], strict=True):
            text = tok.decode(ids, skip_special_tokens=True)
            formatted += bool(re.match(NUMBER_ONLY, text))
            numbers = re.findall(r"-?\d+", text)
            correct += bool(numbers) and numbers[0] == row["solution"]
    return {"accuracy": correct / len(rows), "number_only": formatted / len(rows)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="SmolLM2-135M-Instruct folder (scripts/prepare_smollm2.py)")
    parser.add_argument("out", type=Path, help="run folder")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--held-out", type=int, default=48, help="held-out prompts to compare base and adapter on"
    )
    args = parser.parse_args(argv)

    from vlmtune.testing.rl_data import arithmetic_rows, write_jsonl
    from vlmtune.train import run

    args.out.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(args.out / "prompts.jsonl", arithmetic_rows(256, seed=0, instruction=INSTRUCTION))
    result = run(recipe(args.model, args.out / "run", data, args.steps))
    records = [json.loads(x) for x in result.metrics_file.read_text().splitlines()]
    for r in records:
        print(f"step {r['step']:3d}  reward {r['reward']:.3f}  accuracy {r['reward/accuracy']:.3f}  "
              f"format {r['reward/format']:.3f}  brevity {r['reward/brevity']:.3f}  "
              f"length {r['completion_length']:.1f}", file=sys.stderr)  # fmt: skip
    k = max(1, len(records) // 5)
    # Held-out prompts: another seed, so other questions than training's.
    rows = arithmetic_rows(args.held_out, seed=1, instruction=INSTRUCTION)
    summary = {
        "steps": len(records),
        "reward_first": sum(r["reward"] for r in records[:k]) / k,
        "reward_last": sum(r["reward"] for r in records[-k:]) / k,
        "rewards": [round(r["reward"], 4) for r in records],
        "held_out_base": held_out(args.model, None, rows),
        "held_out_adapter": held_out(args.model, result.adapter_dir, rows),
    }
    print(json.dumps(summary, indent=2))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
