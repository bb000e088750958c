# Entry points named in the README. Each target does its own set-up first.
.PHONY: setup test train bench gpu-check

setup:
	bash scripts/setup.sh

test: setup
	.venv/bin/python -m pytest -q -m "not gpu" tests

train: setup
	.venv/bin/grpo-fast train

bench: setup
	GRPO_FAST_BENCH=1 bash scripts/setup.sh
	.venv/bin/python benchmarks/bench_loss.py

# The one command a GPU machine runs (README "GPU check"): no setup step, it installs against the
# machine's own torch. `make gpu-check OUT=dir`, `make gpu-check ARGS=--dry-run` (no GPU needed).
OUT ?= runs/gpu-check
gpu-check:
	bash scripts/gpu_check.sh $(ARGS) $(OUT)
