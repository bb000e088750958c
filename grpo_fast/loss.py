"""Reference GRPO math in plain PyTorch: group advantages and the loss with materialized logits.

`reference_grpo_loss` is the obviously-correct twin of `grpo_fast.ops.fused_grpo_loss`: it builds
the whole [B, T, V] fp32 logits tensor. Both feed their per-token log-probs to the same objective
(`grpo_fast.loss_types.grpo_objective`), where each loss type's formula and normalizer is written
down.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from grpo_fast import checks
from grpo_fast.loss_types import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, LossConfig, PolicyInputs, grpo_objective

__all__ = ["compute_advantages", "reference_grpo_loss", "make_loss_config"]

ADVANTAGE_EPS = 1e-4
SCALE_REWARDS = ("group", "batch", "none")


# ---------------------------------------------------------------- advantages


def _as_reward_tensor(rewards) -> Tensor:
    if isinstance(rewards, Tensor):
        return rewards.to(torch.float32)
    # Lists may hold None for "this reward function abstains on this sample".
    def conv(x):
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        return float("nan") if x is None else float(x)

    return torch.tensor(conv(list(rewards)), dtype=torch.float32)


def _nanstd(x: Tensor, dim=None) -> Tensor:
    """Bessel-corrected std ignoring NaN (NaN where fewer than two values), like TRL's nanstd."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim) if dim is not None else (~torch.isnan(x)).sum()
    var = torch.nansum((x - mean) ** 2, dim=dim) / (count - 1).clamp(min=0)
    return var.sqrt()


def compute_advantages(
    rewards: Tensor | Sequence,
    num_generations: int,
    scale_rewards: str = "group",
    reward_weights: Tensor | Sequence[float] | None = None,
) -> Tensor:
    """Group-relative advantages [B*G] fp32 from rewards [B*G] or [B*G, F] (F reward functions).

    Rows are grouped as G = `num_generations` consecutive completions of one prompt.

        r_i   = Σ_f w_f R_if over the functions that did not abstain (NaN or None = abstain)
        A_i   = r_i - mean_group(r)                                  scale_rewards="none"
        A_i   = (r_i - mean_group(r)) / (std_group(r) + 1e-4)        scale_rewards="group"
        A_i   = (r_i - mean_group(r)) / (std_batch(r) + 1e-4)        scale_rewards="batch"

    std is Bessel-corrected, means and stds skip unscorable rows (every function abstained). A group
    whose rewards are all equal gets advantage exactly 0 (never NaN, never 1e-13 from rounding of
    the mean); an unscorable row gets 0.
    """
    r = _as_reward_tensor(rewards)
    if r.dim() == 1:
        r = r.unsqueeze(1)  # [B*G, 1]
    if r.dim() != 2 or r.shape[0] == 0 or r.shape[1] == 0:
        raise ValueError(f"rewards must have shape [B*G] or [B*G, F] with B*G, F > 0, got {tuple(r.shape)}")
    if not isinstance(num_generations, int) or isinstance(num_generations, bool) or num_generations < 1:
        raise ValueError(f"num_generations must be a positive int, got {num_generations!r}")
    if r.shape[0] % num_generations != 0:
        raise ValueError(
            f"rewards has {r.shape[0]} rows, not a multiple of num_generations={num_generations}")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    num_funcs = r.shape[1]
    if reward_weights is None:
        w = torch.ones(num_funcs, dtype=torch.float32, device=r.device)
    else:
        w = torch.as_tensor(reward_weights, dtype=torch.float32, device=r.device).flatten()
        if w.numel() != num_funcs:
            raise ValueError(f"reward_weights has {w.numel()} entries, rewards has {num_funcs} functions")
        if not torch.isfinite(w).all():
            raise ValueError("reward_weights must be finite")

    unscorable = torch.isnan(r).all(dim=1)  # [B*G]
    total = torch.nansum(r * w, dim=1)  # [B*G]
    total = total.masked_fill(unscorable, float("nan"))
    grouped = total.view(-1, num_generations)  # [B, G]

    mean = torch.nanmean(grouped, dim=1, keepdim=True)  # [B, 1]
    adv = grouped - mean  # [B, G]
    if scale_rewards == "group":
        adv = adv / (_nanstd(grouped, dim=1).unsqueeze(1) + ADVANTAGE_EPS)
    elif scale_rewards == "batch":
        adv = adv / (_nanstd(total) + ADVANTAGE_EPS)
    # Zero spread inside a group means no preference: exactly 0 (max == min, NaN rows ignored).
    spread_max = torch.where(torch.isnan(grouped), -torch.inf, grouped).amax(dim=1, keepdim=True)
    spread_min = torch.where(torch.isnan(grouped), torch.inf, grouped).amin(dim=1, keepdim=True)
    adv = adv.masked_fill(spread_max <= spread_min, 0.0)
    # Unscorable rows (and a batch std of a single scorable value) carry no signal.
    return torch.nan_to_num(adv, nan=0.0).reshape(-1)


# ---------------------------------------------------------------- argument checks


def check_loss_args(hidden, weight, targets, mask, advantages, old_logprobs, ref_logprobs, bias) -> None:
    """Shapes, dtypes and devices of the loss arguments; ValueError naming the argument."""
    checks.tensor("hidden", hidden, ndim=3, floating=True, contiguous=False)
    B, T, H = hidden.shape
    dev = hidden.device
    checks.tensor("weight", weight, device=dev, shape=("V", H), contiguous=False)
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    V = weight.shape[0]
    if bias is not None:
        checks.tensor("bias", bias, dtypes=(weight.dtype,), device=dev, shape=(V,), contiguous=False)
    checks.tensor("targets", targets, device=dev, shape=(B, T), contiguous=False)
    checks.tensor("mask", mask, device=dev, shape=(B, T), contiguous=False)
    if targets.is_floating_point() or targets.dtype == torch.bool or targets.is_complex():
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    checks.tensor("advantages", advantages, floating=True, device=dev, shape=(B,), contiguous=False)
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if t is not None:
            checks.tensor(name, t, floating=True, device=dev, shape=(B, T), contiguous=False)
    valid = mask != 0
    if valid.any():
        picked = targets[valid]
        if int(picked.min()) < 0 or int(picked.max()) >= V:
            raise ValueError(f"targets must lie in [0, V={V}) where mask is 1")


def make_loss_config(
    loss_type, beta, epsilon_low, epsilon_high, delta, importance_sampling_level,
    max_completion_length, num_items_in_batch, num_sequences_in_batch,
    sapo_temperature_pos, sapo_temperature_neg, temperature, ref_logprobs,
) -> LossConfig:
    """Validate the scalar arguments shared by the reference and the fused loss."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {sorted(LOSS_TYPES)}, got {loss_type!r}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
            f"got {importance_sampling_level!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError(f"ref_logprobs is required when beta != 0 (beta={beta})")
    if epsilon_low < 0:
        raise ValueError(f"epsilon_low must be >= 0, got {epsilon_low}")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    if epsilon_high < 0:
        raise ValueError(f"epsilon_high must be >= 0, got {epsilon_high}")
    if max_completion_length is not None and max_completion_length < 1:
        raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}")
    if num_sequences_in_batch is not None and not isinstance(num_sequences_in_batch, Tensor) \
            and num_sequences_in_batch < 1:
        raise ValueError(f"num_sequences_in_batch must be >= 1, got {num_sequences_in_batch}")
    for name, v in (("sapo_temperature_pos", sapo_temperature_pos), ("sapo_temperature_neg", sapo_temperature_neg)):
        if not v > 0:
            raise ValueError(f"{name} must be > 0, got {v}")
    return LossConfig(
        loss_type=loss_type, beta=float(beta), epsilon_low=float(epsilon_low),
        epsilon_high=float(epsilon_high), delta=delta,
        importance_sampling_level=importance_sampling_level,
        sapo_temperature_pos=float(sapo_temperature_pos), sapo_temperature_neg=float(sapo_temperature_neg),
        max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
        num_sequences_in_batch=num_sequences_in_batch,
    )


def policy_inputs(logp, mask, advantages, old_logprobs, ref_logprobs, entropy) -> PolicyInputs:
    """Cast everything the objective reads to fp32 (log-ratios and KL are always fp32)."""
    f32 = torch.float32
    return PolicyInputs(
        logp=logp, mask=(mask != 0).to(f32), advantages=advantages.to(f32),
        old_logp=None if old_logprobs is None else old_logprobs.to(f32),
        ref_logp=None if ref_logprobs is None else ref_logprobs.to(f32),
        entropy=entropy,
    )


# ---------------------------------------------------------------- the reference loss


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
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss with materialized logits: z = (hidden @ weight.T + bias) / temperature in fp32.

    Shapes: hidden [B, T, H], weight [V, H], targets [B, T] (any value where mask = 0), mask [B, T]
    (nonzero = completion token), advantages [B], old/ref_logprobs [B, T] (None = on-policy / no
    reference). Per token logp = log_softmax(z)[target], entropy = -Σ_v p_v log p_v (no grad).

    `num_items_in_batch` (tokens of the whole optimizer step) and `num_sequences_in_batch`
    (sequences of the whole step) are the normalizers that make micro-batch gradients add up to the
    whole-step gradient; `grpo_fast.loss_types` documents which loss type uses which. Returns
    (loss 0-dim fp32, metrics dict of detached 0-dim tensors).
    """
    check_loss_args(hidden, weight, targets, mask, advantages, old_logprobs, ref_logprobs, bias)
    cfg = make_loss_config(
        loss_type, beta, epsilon_low, epsilon_high, delta, importance_sampling_level,
        max_completion_length, num_items_in_batch, num_sequences_in_batch,
        sapo_temperature_pos, sapo_temperature_neg, temperature, ref_logprobs)

    logits = hidden.float() @ weight.float().T  # [B, T, V] fp32
    if bias is not None:
        logits = logits + bias.float()
    logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)  # [B, T, V]
    safe_targets = torch.where(mask != 0, targets, torch.zeros_like(targets)).long()
    logp = logp_all.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # [B, T]
    logp = logp * (mask != 0)  # masked positions carry no value, like the fused op
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)  # [B, T]

    inputs = policy_inputs(logp, mask, advantages, old_logprobs, ref_logprobs, entropy)
    return grpo_objective(inputs, cfg)
