"""Group-relative advantages from per-function rewards, and the group statistics that go with
them (which groups carry signal, the logged reward totals).

Rows are grouped as G = `num_generations` consecutive completions of one prompt; rewards are
[B*G] or [B*G, F] for F reward functions, NaN (or None) where a function abstains. A row where
every function abstains is unscorable: it is left out of every mean and std and gets advantage 0.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from grpo_fast.loss.options import MULTI_OBJECTIVE_AGGREGATIONS, SCALE_REWARDS

__all__ = ["compute_advantages", "informative_groups", "reward_totals"]

ADVANTAGE_EPS = 1e-4


def _as_reward_tensor(rewards) -> Tensor:
    if isinstance(rewards, Tensor):
        return rewards.to(torch.float32)
    # Lists may hold None for "this reward function abstains on this sample".
    def conv(x):
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        return float("nan") if x is None else float(x)

    return torch.tensor(conv(list(rewards)), dtype=torch.float32)


def _nanstd(x: Tensor, dim=None, keepdim: bool = False) -> Tensor:
    """Bessel-corrected std ignoring NaN (NaN where fewer than two values), like TRL's nanstd."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=keepdim) if dim is not None else (~torch.isnan(x)).sum()
    var = torch.nansum((x - mean) ** 2, dim=dim, keepdim=keepdim) / (count - 1).clamp(min=0)
    return var.sqrt()


def _spread(x: Tensor, dim: int) -> Tensor:
    """max > min along dim, NaN ignored (False when fewer than two values differ)."""
    hi = torch.where(torch.isnan(x), -torch.inf, x).amax(dim=dim)
    lo = torch.where(torch.isnan(x), torch.inf, x).amin(dim=dim)
    return hi > lo


def _checked(rewards, num_generations: int, reward_weights, scale_rewards: str,
             multi_objective_aggregation: str) -> tuple[Tensor, Tensor]:
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
    if multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
        raise ValueError(f"multi_objective_aggregation must be one of {MULTI_OBJECTIVE_AGGREGATIONS}, "
                         f"got {multi_objective_aggregation!r}")
    num_funcs = r.shape[1]
    if reward_weights is None:
        w = torch.ones(num_funcs, dtype=torch.float32, device=r.device)
    else:
        w = torch.as_tensor(reward_weights, dtype=torch.float32, device=r.device).flatten()
        if w.numel() != num_funcs:
            raise ValueError(f"reward_weights has {w.numel()} entries, rewards has {num_funcs} functions")
        if not torch.isfinite(w).all():
            raise ValueError("reward_weights must be finite")
    return r, w


def reward_totals(rewards, reward_weights=None) -> Tensor:
    """r_i = Σ_f w_f R_if over the functions that did not abstain; NaN where all abstained: [B*G]
    (TRL's logged `reward`: its nanmean and nanstd are the step's reward and reward_std)."""
    r = _as_reward_tensor(rewards)
    r = r.unsqueeze(1) if r.dim() == 1 else r
    w = torch.ones(r.shape[1]) if reward_weights is None else torch.as_tensor(reward_weights, dtype=torch.float32)
    total = torch.nansum(r * w.to(r.device), dim=1)
    return total.masked_fill(torch.isnan(r).all(dim=1), float("nan"))


def informative_groups(rewards, num_generations: int, reward_weights=None,
                       multi_objective_aggregation: str = "sum_then_normalize") -> Tensor:
    """[B] bool: the groups whose advantages are not all 0. sum_then_normalize: the weighted totals
    of the group's scorable rows differ; normalize_then_sum: some function with a nonzero weight
    scores the group's rows differently. Dynamic sampling keeps exactly these groups."""
    r, w = _checked(rewards, num_generations, reward_weights, "group", multi_objective_aggregation)
    if multi_objective_aggregation == "sum_then_normalize":
        return _spread(reward_totals(r, w).view(-1, num_generations), dim=1)
    per_func = _spread(r.view(-1, num_generations, r.shape[1]), dim=1)  # [B, F]
    return (per_func & (w != 0)).any(dim=1)


def compute_advantages(
    rewards: Tensor | Sequence,
    num_generations: int,
    scale_rewards: str = "group",
    reward_weights: Tensor | Sequence[float] | None = None,
    *,
    multi_objective_aggregation: str = "sum_then_normalize",
) -> Tensor:
    """Group-relative advantages [B*G] fp32 from rewards [B*G] or [B*G, F].

    sum_then_normalize (TRL's default), with r_i = Σ_f w_f R_if over the functions that scored i:
        A_i = r_i - mean_group(r)                                  scale_rewards="none"
        A_i = (r_i - mean_group(r)) / (std_group(r) + 1e-4)        scale_rewards="group"
        A_i = (r_i - mean_group(r)) / (std_batch(r) + 1e-4)        scale_rewards="batch"
    normalize_then_sum (GDPO, arXiv 2601.05242), each function normalized in its group first:
        Z_if = (R_if - mean_group(R_f)) / (std_group(R_f) + 1e-4),  r_i = Σ_f w_f Z_if
        A_i  = (r_i - mean_batch(r)) / (std_batch(r) + 1e-4)       (scale_rewards is not used)

    std is Bessel-corrected; means and stds skip abstentions and unscorable rows. A group whose
    advantages would all be 0 up to rounding (`informative_groups` is False: its rewards are all
    equal) gets exactly 0, never NaN nor 1e-13 from rounding of the mean (with GDPO, a function
    whose rewards are all equal in a group contributes exactly 0 there); an unscorable row gets 0.
    """
    r, w = _checked(rewards, num_generations, reward_weights, scale_rewards, multi_objective_aggregation)
    G = num_generations
    unscorable = torch.isnan(r).all(dim=1)  # [B*G]
    if multi_objective_aggregation == "sum_then_normalize":
        total = reward_totals(r, w)  # [B*G], NaN when unscorable
        grouped = total.view(-1, G)  # [B, G]
        adv = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
        if scale_rewards == "group":
            adv = adv / (_nanstd(grouped, dim=1, keepdim=True) + ADVANTAGE_EPS)
        elif scale_rewards == "batch":
            adv = adv / (_nanstd(total) + ADVANTAGE_EPS)
    else:
        per_func = r.view(-1, G, r.shape[1])  # [B, G, F]
        centered = per_func - torch.nanmean(per_func, dim=1, keepdim=True)
        std = _nanstd(per_func, dim=1, keepdim=True) if G > 1 else torch.zeros_like(centered[:, :1])
        z = centered / (std + ADVANTAGE_EPS)
        z = z.masked_fill(~_spread(per_func, dim=1).unsqueeze(1), 0.0)  # no spread: exactly 0, not noise / 1e-4
        total = torch.nansum(z * w, dim=2).reshape(-1).masked_fill(unscorable, float("nan"))  # [B*G]
        adv = ((total - torch.nanmean(total)) / (_nanstd(total) + ADVANTAGE_EPS)).view(-1, G)
    adv = adv.masked_fill(~informative_groups(r, G, w, multi_objective_aggregation).unsqueeze(1), 0.0)
    # Unscorable rows (and a batch std of a single scorable value) carry no signal.
    return torch.nan_to_num(adv, nan=0.0).reshape(-1)
