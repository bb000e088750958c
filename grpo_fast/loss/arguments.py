"""Argument checks shared by the reference and the fused loss: tensors (shapes, dtypes, devices)
and scalar options, each a ValueError that names the argument; TRL's warnings for option
combinations it warns about."""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from grpo_fast import checks
from grpo_fast.loss.head import LogitTransform
from grpo_fast.loss.objective import LossParams, PolicyInputs
from grpo_fast.loss.options import (IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPE_NAMES, SAMPLING_CORRECTIONS,
                                    option_warnings)


class LossCall(NamedTuple):
    params: LossParams
    head: LogitTransform


def loss_call(*, hidden, weight, targets, mask, advantages, old_logprobs, ref_logprobs, sampling_logprobs, bias,
              temperature, logit_scale, final_logit_softcapping, backend=None, **options) -> LossCall:
    """Every argument of `reference_grpo_loss` / `fused_grpo_loss` (by name) -> the objective's
    params and the head transform, after checking all of them."""
    check_loss_args(hidden, weight, targets, mask, advantages, old_logprobs, ref_logprobs, bias, sampling_logprobs)
    head = LogitTransform(temperature, logit_scale, final_logit_softcapping).check()
    params = loss_params(**options, has_ref=ref_logprobs is not None, has_sampling=sampling_logprobs is not None)
    return LossCall(params, head)


def check_loss_args(hidden, weight, targets, mask, advantages, old_logprobs, ref_logprobs, bias,
                    sampling_logprobs=None) -> None:
    """Shapes, dtypes and devices of the loss's tensor arguments."""
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
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs),
                    ("sampling_logprobs", sampling_logprobs)):
        if t is not None:
            checks.tensor(name, t, floating=True, device=dev, shape=(B, T), contiguous=False)
    valid = mask != 0
    if valid.any():
        picked = targets[valid]
        if int(picked.min()) < 0 or int(picked.max()) >= V:
            raise ValueError(f"targets must lie in [0, V={V}) where mask is 1")


def _number(name: str, v, *, low=None, low_open=False, high=None, optional=False):
    if v is None and optional:
        return None
    if isinstance(v, Tensor) and v.numel() == 1:
        return v  # a step-global count or threshold computed on the device: not synced here
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {v}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {v}")
    return v


def loss_params(*, loss_type: str, beta: float = 0.0, epsilon_low: float = 0.2, epsilon_high: float | None = None,
                delta: float | None = None, importance_sampling_level: str = "token",
                max_completion_length: int | None = None, num_items_in_batch=None, num_sequences_in_batch=None,
                sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05, vespo_k_pos: float = 2.0,
                vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0,
                use_bias_correction_kl: bool = True, top_entropy_quantile: float = 1.0, entropy_threshold=None,
                entropy_coef: float = 0.0, num_entropy_items_in_batch=None,
                off_policy_mask_threshold: float | None = None, sampling_correction: str = "none",
                sampling_correction_clip_min: float | None = None, sampling_correction_clip_max: float | None = 3.0,
                has_ref: bool = True, has_sampling: bool = True) -> LossParams:
    """Validate the scalar options (keyword-only; has_ref / has_sampling: whether ref_logprobs /
    sampling_logprobs were given) and warn where TRL warns."""
    if loss_type not in LOSS_TYPE_NAMES:
        raise ValueError(f"loss_type must be one of {list(LOSS_TYPE_NAMES)}, got {loss_type!r}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                         f"got {importance_sampling_level!r}")
    _number("beta", beta)
    if beta != 0.0 and not has_ref:
        raise ValueError(f"ref_logprobs is required when beta != 0 (beta={beta})")
    _number("epsilon_low", epsilon_low, low=0)
    warn_epsilon_high = epsilon_high
    epsilon_high = epsilon_low if epsilon_high is None else _number("epsilon_high", epsilon_high, low=0)
    _number("delta", delta, optional=True)
    if max_completion_length is not None and max_completion_length < 1:
        raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}")
    _number("num_items_in_batch", num_items_in_batch, low=0, optional=True)
    _number("num_sequences_in_batch", num_sequences_in_batch, low=1, optional=True)
    _number("num_entropy_items_in_batch", num_entropy_items_in_batch, low=0, optional=True)
    for name, v in (("sapo_temperature_pos", sapo_temperature_pos), ("sapo_temperature_neg", sapo_temperature_neg)):
        _number(name, v, low=0, low_open=True)
    for name, v in (("vespo_k_pos", vespo_k_pos), ("vespo_k_neg", vespo_k_neg), ("vespo_lambda_pos", vespo_lambda_pos),
                    ("vespo_lambda_neg", vespo_lambda_neg)):
        _number(name, v, low=0)
    _number("top_entropy_quantile", top_entropy_quantile, low=0, high=1)
    _number("entropy_threshold", entropy_threshold, optional=True)
    _number("entropy_coef", entropy_coef)
    _number("off_policy_mask_threshold", off_policy_mask_threshold, optional=True)
    if sampling_correction not in SAMPLING_CORRECTIONS:
        raise ValueError(f"sampling_correction must be one of {SAMPLING_CORRECTIONS}, got {sampling_correction!r}")
    lo = _number("sampling_correction_clip_min", sampling_correction_clip_min, low=0, optional=True)
    hi = _number("sampling_correction_clip_max", sampling_correction_clip_max, low=0, low_open=True, optional=True)
    if lo is not None and hi is not None and lo >= hi:
        raise ValueError(f"sampling_correction_clip_min ({lo}) must be < sampling_correction_clip_max ({hi})")
    if sampling_correction != "none":
        if not has_sampling:
            raise ValueError(f"sampling_correction={sampling_correction!r} needs sampling_logprobs")
        if sampling_correction.endswith("truncate") and lo is None and hi is None:
            raise ValueError("sampling_correction_clip_min or _clip_max must be set for a *_truncate correction")
        if loss_type == "vespo" and not sampling_correction.startswith("token"):
            raise ValueError(f"loss_type='vespo' takes a token_* sampling_correction (it folds the per-token "
                             f"ratios into its sequence weight), got {sampling_correction!r}")
    for message in option_warnings(loss_type, importance_sampling_level, warn_epsilon_high):
        warnings.warn(message, stacklevel=4)  # the caller of reference_grpo_loss / fused_grpo_loss
    return LossParams(
        loss_type=loss_type, beta=float(beta), epsilon_low=float(epsilon_low), epsilon_high=float(epsilon_high),
        delta=None if delta is None else float(delta), importance_sampling_level=importance_sampling_level,
        sapo_temperature_pos=float(sapo_temperature_pos), sapo_temperature_neg=float(sapo_temperature_neg),
        vespo_k_pos=float(vespo_k_pos), vespo_lambda_pos=float(vespo_lambda_pos), vespo_k_neg=float(vespo_k_neg),
        vespo_lambda_neg=float(vespo_lambda_neg), use_bias_correction_kl=bool(use_bias_correction_kl),
        top_entropy_quantile=float(top_entropy_quantile), entropy_threshold=entropy_threshold,
        entropy_coef=float(entropy_coef), off_policy_mask_threshold=off_policy_mask_threshold,
        sampling_correction=sampling_correction, sampling_correction_clip_min=lo, sampling_correction_clip_max=hi,
        max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
        num_sequences_in_batch=num_sequences_in_batch, num_entropy_items_in_batch=num_entropy_items_in_batch,
    )


def policy_inputs(logp, mask, advantages, old_logprobs, ref_logprobs, entropy, sampling_logprobs=None) -> PolicyInputs:
    """Cast everything the objective reads to fp32 (log-ratios and KL are always fp32)."""
    f32 = torch.float32

    def opt(t):
        return None if t is None else t.to(f32)

    return PolicyInputs(logp=logp, mask=(mask != 0).to(f32), advantages=advantages.to(f32),
                        old_logp=opt(old_logprobs), ref_logp=opt(ref_logprobs), entropy=entropy,
                        sampling_logp=opt(sampling_logprobs))
