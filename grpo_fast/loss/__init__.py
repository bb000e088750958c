"""The GRPO loss, in one package.

    options.py           the option names (loss types, levels, aggregations, corrections), defined once
    advantages.py        group-relative advantages (sum_then_normalize, GDPO), informative groups
    objective.py         the objective on per-token log-probs: the loss-type table and every option
    arguments.py         argument checks shared by the reference and the fused op
    reference.py         reference_grpo_loss: plain PyTorch with materialized logits (the oracle)
    fused.py             fused_grpo_loss, selective_logprobs: the public fused ops (also grpo_fast.ops)
    logprob_function.py  the autograd Function and the backend choice
    logprob_cpu.py       the chunked CPU backend (the Triton one is grpo_fast.kernels.logprob)
    head.py              the logits' transform: temperature, scale, soft cap
    entropy_control.py   the entropy bonus's adaptive coefficient and the step's entropy threshold

`from grpo_fast.loss import compute_advantages, reference_grpo_loss` imports torch on first use
only, so the run config can read the option names without it.
"""
from grpo_fast.loss.options import (IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPE_NAMES, MULTI_OBJECTIVE_AGGREGATIONS,
                                    OLD_LOGPROBS_SOURCES, SAMPLING_CORRECTIONS, SCALE_REWARDS)

__all__ = ["compute_advantages", "informative_groups", "reward_totals", "reference_grpo_loss", "fused_grpo_loss",
           "selective_logprobs", "entropy_threshold", "LossParams", "LOSS_TYPE_NAMES", "IMPORTANCE_SAMPLING_LEVELS",
           "SCALE_REWARDS", "MULTI_OBJECTIVE_AGGREGATIONS", "SAMPLING_CORRECTIONS", "OLD_LOGPROBS_SOURCES"]

_LAZY = {
    "compute_advantages": "advantages", "informative_groups": "advantages", "reward_totals": "advantages",
    "reference_grpo_loss": "reference", "fused_grpo_loss": "fused", "selective_logprobs": "fused",
    "entropy_threshold": "objective", "LossParams": "objective",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"grpo_fast.loss.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'grpo_fast.loss' has no attribute {name!r}")
