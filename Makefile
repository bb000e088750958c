# Entry points named in the README. Each target does its own set-up first.
.PHONY: setup test train bench

setup:
	bash scripts/setup.sh

test: setup
	.venv/bin/python -m pytest -q -m "not gpu" tests

train: setup
	.venv/bin/grpo-fast train

bench: setup
	GRPO_FAST_BENCH=1 bash scripts/setup.sh
	.venv/bin/python benchmarks/bench_loss.py
