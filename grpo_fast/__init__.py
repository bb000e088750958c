"""grpo-fast: kernel-level single-GPU GRPO fine-tuning."""

__version__ = "0.1.0"
