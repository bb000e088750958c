#!/usr/bin/env bash
# The one command a GPU machine runs (README "GPU check"): builds grpo-fast against the torch
# that is there (nvcc for this GPU's arch only), runs the GPU tests and a short GPU benchmark
# set, each stage under its own time limit, all in under 8 minutes, and writes OUT_DIR/summary.json.
#
#   bash scripts/gpu_check.sh [OUT_DIR]              # default OUT_DIR: runs/gpu-check
#   bash scripts/gpu_check.sh --dry-run [OUT_DIR]    # rehearsal without a GPU (what CI runs)
#   GRPO_FAST_WHEELS=.whl bash scripts/gpu_check.sh  # extra wheels (scripts/fetch_gpu_wheels.sh); .whl/ is the default
#
# PYTHON picks the interpreter (default python3: on the GPU image, the one with CUDA torch).
# Stage runner and stage bodies: scripts/gpu_check.py, scripts/gpu_stages.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
