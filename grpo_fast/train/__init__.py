"""The GRPO trainer: model setup (model.py), generation adapter (generation.py), loss adapter
(policy_loss.py), the loop (loop.py), checkpoints, metrics and evaluation."""
