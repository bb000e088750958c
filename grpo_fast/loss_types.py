"""The GRPO objective on per-token log-probs: one small function per loss type, in a table.

Everything here works on [B, T] fp32 tensors that are cheap next to the LM head: the reference
(`grpo_fast.loss`) feeds it log-probs from materialized logits, the fused op (`grpo_fast.ops`)
feeds it log-probs from the fused kernel. Autograd flows through `logp` only.

Notation (per sequence b, token t; A_b the advantage, m_bt the 0/1 mask):

    r_bt    = logp_bt - old_bt                      log-ratio (old = logp.detach() when on-policy)
    token:    w_bt = r_bt                           importance_sampling_level="token"
    sequence: w_b  = sum_t m_bt r_bt / max(1, sum_t m_bt)   (GSPO), broadcast over t
    c1      = exp(clamp(w, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))            the ratio
    kl_bt   = exp(d) - d - 1,  d = clamp(ref_bt - logp_bt, ±LOG_RATIO_CLAMP)   (k3 estimator)

Per-token surrogate ℓ_bt (TRL 1.x `GRPOTrainer._compute_loss`):

    grpo, bnpo, dr_grpo, dapo:  ℓ = -min(c1' A, clamp(c1, 1-ε_low, 1+ε_high) A)
                                with c1' = min(c1, δ) when `delta` is set (two-sided, INTELLECT-2)
    cispo:                      ℓ = -sg[min(c1, ε_high)] A logp            (sg = stop-gradient)
    sapo:                       ℓ = -(4/τ) σ(τ (c1 - 1)) A,  τ = τ_pos if A > 0 else τ_neg
    then ℓ += β kl_bt when β != 0.

Aggregation L of one call (the micro-batch). Each normalizer is the step-global quantity, so
that summing L over the micro-batches of a step gives the loss of the whole step, and the
accumulated gradient does not depend on how the step was split:

    grpo, sapo:      L = Σ_b [Σ_t m ℓ / max(1, Σ_t m)] / S     S = num_sequences_in_batch (default B)
    dr_grpo:         L = Σ_bt m ℓ / (S · L_max)                L_max = max_completion_length (default T)
    bnpo, dapo, cispo: L = Σ_bt m ℓ / max(1, N)                N = num_items_in_batch (default Σ m)

With the defaults (one call = the whole step) these are exactly TRL's formulas. TRL divides grpo,
sapo, bnpo and dr_grpo by the accumulation step count instead, which equals S / B only when all
micro-batches have the same size; bnpo additionally normalizes by the micro-batch's own tokens
(TRL documents that its result depends on the split). Here bnpo takes the step's token count like
dapo, so under micro-batching bnpo and dapo coincide. dapo's `num_items_in_batch` is the token
count of the whole step (the fix of trl#5619).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

# exp(20) ≈ 4.9e8: far beyond any clip range, small enough that exp never overflows fp32 and the
# loss stays finite when a policy drifts far from the sampler.
LOG_RATIO_CLAMP = 20.0

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class LossConfig:
    """Hyper-parameters of the objective (names follow TRL's GRPOConfig)."""

    loss_type: str
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    importance_sampling_level: str = "token"
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    max_completion_length: int | None = None
    num_items_in_batch: float | Tensor | None = None
    num_sequences_in_batch: float | Tensor | None = None


class PolicyInputs(NamedTuple):
    """What the objective needs besides the config; every tensor [B, T] unless noted."""

    logp: Tensor                # [B, T] fp32, differentiable; 0 where mask = 0
    mask: Tensor                # [B, T] fp32 in {0, 1}
    advantages: Tensor          # [B] fp32
    old_logp: Tensor | None     # [B, T] fp32; None = on-policy
    ref_logp: Tensor | None     # [B, T] fp32; needed when beta != 0
    entropy: Tensor | None      # [B, T] fp32, no grad; metric only


class Surrogate(NamedTuple):
    per_token_loss: Tensor      # [B, T] or [B, 1]
    low_clipped: Tensor         # bool, same shape: the ratio was clipped from below
    high_clipped: Tensor        # bool, same shape: the ratio was clipped from above


# ---------------------------------------------------------------- per-token surrogates


def clipped_surrogate(coef_1: Tensor, logp: Tensor, adv: Tensor, cfg: LossConfig) -> Surrogate:
    """PPO clip: -min(c1' A, clamp(c1, 1-ε_low, 1+ε_high) A); c1' = min(c1, δ) if δ is set."""
    coef_2 = coef_1.clamp(1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    coef_1_capped = coef_1.clamp(max=cfg.delta) if cfg.delta is not None else coef_1
    loss = -torch.minimum(coef_1_capped * adv, coef_2 * adv)
    low = (coef_1 < 1 - cfg.epsilon_low) & (adv < 0)
    high = (coef_1 > 1 + cfg.epsilon_high) & (adv > 0)
    return Surrogate(loss, low, high)


def cispo_surrogate(coef_1: Tensor, logp: Tensor, adv: Tensor, cfg: LossConfig) -> Surrogate:
    """CISPO (MiniMax-M1): -sg[min(c1, ε_high)] A logp; the weight is clipped, not the update."""
    weight = coef_1.clamp(max=cfg.epsilon_high).detach()
    loss = -weight * adv * logp
    high = (coef_1 > cfg.epsilon_high) & (adv > 0)
    return Surrogate(loss, torch.zeros_like(high), high)


def sapo_surrogate(coef_1: Tensor, logp: Tensor, adv: Tensor, cfg: LossConfig) -> Surrogate:
    """SAPO: -(4/τ) σ(τ (c1 - 1)) A, τ = τ_pos for A > 0 else τ_neg; a soft gate, no clipping."""
    tau = torch.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
    loss = -(4.0 / tau) * torch.sigmoid(tau * (coef_1 - 1)) * adv
    none = torch.zeros(loss.shape, dtype=torch.bool, device=loss.device)
    return Surrogate(loss, none, none)


# ---------------------------------------------------------------- aggregations


def _num_sequences(mask: Tensor, cfg: LossConfig):
    """S, at least 1: an empty batch (B = 0) sums to 0 and must give a loss of 0, not 0 / 0."""
    n = mask.shape[0] if cfg.num_sequences_in_batch is None else cfg.num_sequences_in_batch
    return n.clamp(min=1) if isinstance(n, Tensor) else max(n, 1)


def sequence_mean(ptl: Tensor, mask: Tensor, cfg: LossConfig) -> Tensor:
    """Σ_b [Σ_t m ℓ / max(1, Σ_t m)] / S: each sequence weighs the same (grpo, sapo, GSPO)."""
    per_seq = (ptl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # [B]
    return per_seq.sum() / _num_sequences(mask, cfg)


def token_sum_over_items(ptl: Tensor, mask: Tensor, cfg: LossConfig) -> Tensor:
    """Σ_bt m ℓ / max(1, N), N = tokens of the whole step (bnpo, dapo, cispo)."""
    n = mask.sum() if cfg.num_items_in_batch is None else cfg.num_items_in_batch
    n = n.clamp(min=1.0) if isinstance(n, Tensor) else max(float(n), 1.0)
    return (ptl * mask).sum() / n


def token_sum_over_constant(ptl: Tensor, mask: Tensor, cfg: LossConfig) -> Tensor:
    """Σ_bt m ℓ / (S · L_max): a constant normalizer, no length bias (dr_grpo)."""
    length = mask.shape[1] if cfg.max_completion_length is None else cfg.max_completion_length
    return (ptl * mask).sum() / (_num_sequences(mask, cfg) * max(length, 1))


class LossType(NamedTuple):
    surrogate: Callable[[Tensor, Tensor, Tensor, LossConfig], Surrogate]
    aggregate: Callable[[Tensor, Tensor, LossConfig], Tensor]


LOSS_TYPES: dict[str, LossType] = {
    "grpo": LossType(clipped_surrogate, sequence_mean),
    "bnpo": LossType(clipped_surrogate, token_sum_over_items),
    "dr_grpo": LossType(clipped_surrogate, token_sum_over_constant),
    "dapo": LossType(clipped_surrogate, token_sum_over_items),
    "cispo": LossType(cispo_surrogate, token_sum_over_items),
    "sapo": LossType(sapo_surrogate, sequence_mean),
}


# ---------------------------------------------------------------- the objective


def log_importance_weights(logp: Tensor, old_logp: Tensor | None, mask: Tensor, level: str) -> Tensor:
    """log c1 before the clamp: [B, T] at token level, [B, 1] at sequence level (GSPO)."""
    log_ratio = logp - (logp.detach() if old_logp is None else old_logp)  # [B, T]
    if level == "token":
        return log_ratio
    return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # [B, 1]


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """exp(d) - d - 1 with d = ref - logp (≥ 0, unbiased for KL(π‖π_ref)); fp32, clamped d."""
    d = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(d) - d - 1


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Token mean for [B, T]; for [B, 1] (sequence level) the mean over non-empty sequences."""
    if x.shape[-1] == 1 and mask.shape[-1] != 1:
        mask = (mask.sum(-1, keepdim=True) > 0).to(mask.dtype)
    x = x.to(torch.float32).expand_as(mask) if x.shape != mask.shape else x.to(torch.float32)
    return ((x * mask).sum() / mask.sum().clamp(min=1.0)).detach()


def grpo_objective(inp: PolicyInputs, cfg: LossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss (0-dim fp32, differentiable through `inp.logp`) and metrics (0-dim, detached).

    Metrics: "kl" (mean k3 KL over tokens; 0 without ref log-probs), "entropy" (mean over tokens),
    "ratio" (mean c1), "clip_ratio/low", "clip_ratio/high", "clip_ratio/region" (fractions of
    tokens, or of non-empty sequences at sequence level, whose ratio was clipped where it matters:
    below 1-ε_low with A < 0, above 1+ε_high with A > 0; cispo reports its weight clip
    c1 > ε_high with A > 0 as "high"; sapo never clips), "num_tokens" (Σ mask).
    """
    if cfg.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {sorted(LOSS_TYPES)}, got {cfg.loss_type!r}")
    variant = LOSS_TYPES[cfg.loss_type]
    logp, mask = inp.logp, inp.mask
    adv = inp.advantages.unsqueeze(-1)  # [B, 1]

    log_w = log_importance_weights(logp, inp.old_logp, mask, cfg.importance_sampling_level)
    coef_1 = torch.exp(log_w.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # [B, T] or [B, 1]
    sur = variant.surrogate(coef_1, logp, adv, cfg)
    per_token_loss = sur.per_token_loss.expand_as(logp)  # [B, T]

    kl = k3_kl(logp, inp.ref_logp) if inp.ref_logp is not None else None  # [B, T]
    if cfg.beta != 0.0:
        per_token_loss = per_token_loss + cfg.beta * kl
    loss = variant.aggregate(per_token_loss, mask, cfg)

    zero = torch.zeros((), dtype=torch.float32, device=logp.device)
    metrics = {
        "kl": _masked_mean(kl, mask) if kl is not None else zero,
        "entropy": _masked_mean(inp.entropy, mask) if inp.entropy is not None else zero,
        "ratio": _masked_mean(coef_1, mask),
        "clip_ratio/low": _masked_mean(sur.low_clipped, mask),
        "clip_ratio/high": _masked_mean(sur.high_clipped, mask),
        "clip_ratio/region": _masked_mean(sur.low_clipped | sur.high_clipped, mask),
        "num_tokens": mask.sum().detach(),
    }
    return loss, metrics
