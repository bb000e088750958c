"""The public fused ops (they live in `grpo_fast.loss.fused`):

    fused_grpo_loss(hidden, lm_head.weight, targets, mask, advantages, old, ref, loss_type=...)
    selective_logprobs(hidden, lm_head.weight, targets, temperature)
"""
from grpo_fast.loss.fused import fused_grpo_loss, selective_logprobs

__all__ = ["fused_grpo_loss", "selective_logprobs"]
