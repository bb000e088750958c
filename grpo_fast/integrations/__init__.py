"""grpo-fast's fused ops inside other trainers: `grpo_fast.integrations.trl` (TRL's GRPOTrainer)."""
