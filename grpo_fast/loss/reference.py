"""The reference GRPO loss in plain PyTorch, with materialized logits: the oracle of the tests.

`reference_grpo_loss` is the obviously-correct twin of `grpo_fast.ops.fused_grpo_loss` (same
signature, checked by a test): it builds the whole [B, T, V] fp32 logits tensor. Both feed their
per-token log-probs and entropies to the same objective (`grpo_fast.loss.objective`), where each
loss type's formula, each option and each normalizer is written down.
"""
from __future__ import annotations

import torch
from torch import Tensor

from grpo_fast.loss.arguments import loss_call, policy_inputs
from grpo_fast.loss.objective import grpo_objective

__all__ = ["reference_grpo_loss"]


def reference_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor,
    advantages: Tensor,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    *,
    loss_type: str,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    temperature: float = 1.0,
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: float | Tensor | None = None,
    bias: Tensor | None = None,
    num_sequences_in_batch: float | Tensor | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    use_bias_correction_kl: bool = True,
    top_entropy_quantile: float = 1.0,
    entropy_threshold: float | Tensor | None = None,
    entropy_coef: float = 0.0,
    num_entropy_items_in_batch: float | Tensor | None = None,
    off_policy_mask_threshold: float | None = None,
    sampling_logprobs: Tensor | None = None,
    sampling_correction: str = "none",
    sampling_correction_clip_min: float | None = None,
    sampling_correction_clip_max: float | None = 3.0,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss with materialized logits z = LogitTransform(y), y = hidden @ weight.T + bias, fp32.

    Shapes: hidden [B, T, H], weight [V, H], targets [B, T] (any value where mask = 0), mask [B, T]
    (nonzero = completion token), advantages [B], old/ref/sampling_logprobs [B, T] (None =
    on-policy / no reference / no sampler log-probs). Per token logp = log_softmax(z)[target],
    entropy = -Σ_v p_v log p_v (differentiable when entropy_coef != 0).

    z = c · tanh(s · y / c) / T with c = final_logit_softcapping (z = s · y / T without), s =
    logit_scale, T = temperature (`grpo_fast.loss.head`). The normalizers num_items_in_batch
    (tokens of the whole optimizer step), num_sequences_in_batch (its sequences),
    num_entropy_items_in_batch (its tokens under the entropy mask) and entropy_threshold (the
    quantile of its entropies, `grpo_fast.loss.entropy_threshold`) make micro-batch gradients add
    up to the whole step's; `grpo_fast.loss.objective` documents every option. Returns (loss 0-dim
    fp32, metrics dict of detached 0-dim tensors).
    """
    call = loss_call(**locals())  # every argument above, by name: checked in one place
    logits = hidden.float() @ weight.float().T  # [B, T, V] fp32
    if bias is not None:
        logits = logits + bias.float()
    logp_all = torch.log_softmax(call.head.apply(logits), dim=-1)  # [B, T, V]
    safe_targets = torch.where(mask != 0, targets, torch.zeros_like(targets)).long()
    logp = logp_all.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # [B, T]
    logp = logp * (mask != 0)  # masked positions carry no value, like the fused op
    with torch.set_grad_enabled(torch.is_grad_enabled() and call.params.entropy_coef != 0.0):
        entropy = -(logp_all.exp() * logp_all).sum(-1)  # [B, T]

    inputs = policy_inputs(logp, mask, advantages, old_logprobs, ref_logprobs, entropy, sampling_logprobs)
    return grpo_objective(inputs, call.params)
