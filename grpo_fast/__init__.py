"""grpo-fast: kernel-level GRPO fine-tuning. `from grpo_fast import GRPOTrainer, GRPOConfig`."""

__version__ = "0.1.0"
__all__ = ["GRPOConfig", "GRPOTrainer"]


def __getattr__(name):
    # Imported on first use: `import grpo_fast` (or its kernels / ops) does not pull transformers in.
    if name == "GRPOTrainer":
        from grpo_fast.trainer import GRPOTrainer

        return GRPOTrainer
    if name == "GRPOConfig":
        from grpo_fast.grpo_config import GRPOConfig

        return GRPOConfig
    raise AttributeError(f"module 'grpo_fast' has no attribute {name!r}")
