"""The loss options' names, defined once: the ops, the reference and the run config
(`grpo_fast.config`) all read them from here. No torch import, so the config stays light.

Names and defaults are TRL 1.16's `GRPOConfig` ones where TRL has the option; the sampler
correction is TRL's `vllm_importance_sampling_*` under a sampler-neutral name.
"""

from __future__ import annotations

LOSS_TYPE_NAMES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")  # the second is GDPO
# How the loss corrects for the sampler's log-probs differing from the trainer's (TRL's
# vllm_importance_sampling_mode); "none": measured and logged, not corrected.
SAMPLING_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
# Where the old log-probs of num_iterations > 1 come from: a scoring pass, or the sampler.
OLD_LOGPROBS_SOURCES = ("rescore", "sampler")

# Loss types whose surrogate clips the ratio (PPO-style); their clip metrics are TRL's clip_ratio/*.
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# Loss types that sum per-token losses: a sequence-level ratio then weighs a sequence by its length.
TOKEN_SUM_LOSS_TYPES = ("bnpo", "dr_grpo", "dapo", "cispo")


def option_warnings(loss_type: str, importance_sampling_level: str, epsilon_high: float | None) -> list[str]:
    """The warnings TRL 1.16 gives for these combinations (and one for cispo's ε_high)."""
    out = []
    if loss_type == "luspo" and importance_sampling_level != "sequence":
        out.append("loss_type='luspo' is meant for importance_sampling_level='sequence' (the LUSPO paper's setup)")
    if loss_type == "vespo" and importance_sampling_level != "token":
        out.append("loss_type='vespo' computes its sequence-level weights itself; importance_sampling_level "
                   "should be 'token' (the default)")
    if importance_sampling_level == "sequence" and loss_type in TOKEN_SUM_LOSS_TYPES:
        out.append(f"importance_sampling_level='sequence' with loss_type={loss_type!r} sums per-token losses, which "
                   f"weighs each sequence by its length; GSPO's setup is loss_type='grpo'")
    if loss_type == "cispo" and epsilon_high is None:
        out.append("loss_type='cispo' clips the importance weight at epsilon_high, which is unset and so equals "
                   "epsilon (0.2 by default): TRL recommends epsilon_high around 5 for cispo")
    return out
