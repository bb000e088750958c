"""The one place the trainer meets the loss: hidden states of the completion tokens (the packed
training forward) -> `grpo_fast.ops` (fused loss, selective log-probs). The policy's decoder and
LM head come resolved once per step (`PolicyModules`).
"""

from __future__ import annotations

import torch

from grpo_fast.ops import fused_grpo_loss, selective_logprobs
from grpo_fast.train.model import PolicyModules, reference_policy
from grpo_fast.train.packed_forward import completion_hidden
from grpo_fast.train.rollout_batch import SequenceBatch


@torch.no_grad()
def score_logprobs(policy: PolicyModules, batch: SequenceBatch, *, temperature: float, reference: bool = False,
                   micro_batch_size: int = 0) -> torch.Tensor:
    """Per-token log-probs [N, C] fp32 of the completions under the policy (or, with
    reference=True, the reference policy = adapters disabled); 0 where mask = 0."""
    head = policy.head
    step = micro_batch_size or len(batch)
    outs = []
    for start in range(0, len(batch), step):
        part = batch.select(slice(start, start + step))
        if reference:
            with reference_policy(policy.model):
                hidden = completion_hidden(policy.decoder, part)
        else:
            hidden = completion_hidden(policy.decoder, part)
        outs.append(selective_logprobs(hidden, head.weight.to(hidden.dtype), part.targets, temperature=temperature,
                                       bias=head.bias, mask=part.mask))
    return torch.cat(outs, 0).float()


def policy_loss(policy: PolicyModules, batch: SequenceBatch, advantages: torch.Tensor, old_logprobs, ref_logprobs, *,
                loss_cfg, temperature: float, max_completion_length: int, num_items_in_batch: float,
                num_sequences_in_batch: int):
    """fused_grpo_loss on one micro-batch. The normalizers are those of the whole step, so the
    micro-batch losses add up to the step's loss and their gradients to the step's gradient."""
    head = policy.head
    hidden = completion_hidden(policy.decoder, batch)
    return fused_grpo_loss(
        hidden, head.weight.to(hidden.dtype), batch.targets, batch.mask, advantages, old_logprobs, ref_logprobs,
        loss_type=loss_cfg.loss_type, beta=loss_cfg.beta, epsilon_low=loss_cfg.epsilon,
        epsilon_high=loss_cfg.epsilon_high, delta=loss_cfg.delta, temperature=temperature,
        importance_sampling_level=loss_cfg.importance_sampling_level, max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch, num_sequences_in_batch=num_sequences_in_batch, bias=head.bias)
