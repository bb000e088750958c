"""The GRPO job a config describes: `train(cfg)` is `GRPOTrainer(args=cfg).train()` (the recipe
lives in grpo_fast/trainer.py; its components in this package)."""

from __future__ import annotations

from grpo_fast.config import Config
from grpo_fast.trainer import GRPOTrainer, RunResult


def train(cfg: Config, *, echo=print) -> RunResult:
    """Run the job; see GRPOTrainer.train for what it saves, resumes and refuses."""
    return GRPOTrainer(args=cfg, echo=echo).train()
