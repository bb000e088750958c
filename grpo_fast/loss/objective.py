"""The GRPO objective on per-token log-probs: one small function per loss type, in a table, and
the options every loss type shares (KL, masks, entropy bonus, sampler correction).

Everything here works on [B, T] fp32 tensors that are cheap next to the LM head: the reference
(`grpo_fast.loss.reference`) feeds it log-probs from materialized logits, the fused op
(`grpo_fast.loss.fused`) log-probs from the fused kernels. Autograd flows through `logp`, and
through `entropy` when the entropy bonus is on.

Notation (per sequence b, token t; A_b the advantage, m_bt the 0/1 mask; TRL 1.16's
`GRPOTrainer._compute_loss` term by term):

    r_bt    = logp_bt - old_bt                      log-ratio (old = logp.detach() when on-policy)
    token:    w_bt = r_bt                           importance_sampling_level="token"
    sequence: w_b  = Σ_t m_bt r_bt / max(1, Σ_t m_bt)   (GSPO), broadcast over t
    c1      = exp(clamp(w, ±LOG_RATIO_CLAMP))                               the ratio
    kl_bt   = exp(min(d, LOG_RATIO_CLAMP)) - d - 1,  d = ref_bt - logp_bt   (k3; × c1 with
              use_bias_correction_kl, which makes its gradient the unbiased reverse-KL gradient)

Per-token surrogate ℓ_bt:

    grpo, bnpo, dr_grpo, dapo, luspo:  ℓ = -min(c1' A, clamp(c1, 1-ε_low, 1+ε_high) A)
                                       with c1' = min(c1, δ) when `delta` is set (INTELLECT-2)
    cispo:  ℓ = -sg[min(c1, ε_high)] A logp                         (sg = stop-gradient)
    sapo:   ℓ = -(4/τ) σ(τ (c1 - 1)) A,  τ = τ_pos if A > 0 else τ_neg
    vespo:  ℓ = -sg[φ(W_b)] A logp,  φ(W) = exp(λ + k log W - λ W),  log W_b = clamp(Σ_t m r_bt
            (+ Σ_t log ρ_bt, the sampler correction), log 1e-8, 20); (k, λ) = (k_pos, λ_pos) if A ≥ 0

then, in this order: ℓ *= the off-policy mask (a sequence with A < 0 whose mean log-ratio
sampler-vs-current exceeds `off_policy_mask_threshold` is dropped, DeepSeek-V3.2), ℓ *= the
high-entropy mask (tokens whose entropy is ≥ the step's (1 - ρ) quantile, ρ =
`top_entropy_quantile`), ℓ *= ρ_bt the sampler correction (not for vespo, which has it inside φ),
ℓ += β kl.

Aggregation L of one call (the micro-batch). Each normalizer is the step-global quantity, so
that summing L over the micro-batches of a step gives the loss of the whole step, and the
accumulated gradient does not depend on how the step was split:

    grpo, sapo:               L = Σ_b [Σ_t m ℓ / max(1, Σ_t m)] / S   S = num_sequences_in_batch (default B)
    luspo:                    L = Σ_bt m ℓ / S                      (each sequence weighs its length)
    dr_grpo:                  L = Σ_bt m ℓ / (S · L_max)            L_max = max_completion_length (default T)
    bnpo, dapo, cispo, vespo: L = Σ_bt m ℓ / max(1, N)              N = num_items_in_batch (default Σ m)

and the entropy bonus: L -= c Σ_bt m' H_bt / max(1, N'), m' = m × the high-entropy mask, N' =
num_entropy_items_in_batch (default Σ m'), c = entropy_coef. With the defaults (one call = the
whole step) these are exactly TRL's formulas. TRL divides grpo, sapo, bnpo, dr_grpo and luspo by
the accumulation step count instead, which equals S / B only when all micro-batches have the same
size; bnpo additionally normalizes by the micro-batch's own tokens, and the high-entropy
threshold is a quantile of the micro-batch's own tokens (TRL's results depend on the split).
Here bnpo takes the step's token count like dapo, and the threshold is given for the whole step
(`entropy_threshold`; the quantile of this call's tokens when None).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from grpo_fast.loss.options import CLIPPED_LOSS_TYPES, LOSS_TYPE_NAMES

# exp(20) ≈ 4.9e8: far beyond any clip range, small enough that exp never overflows fp32 and the
# loss stays finite when a policy drifts far from the sampler.
LOG_RATIO_CLAMP = 20.0
# VESPO's lower bound on the sequence log-weight (the paper's implementation clamps w at 1e-8).
VESPO_LOG_W_MIN = math.log(1e-8)


@dataclass(frozen=True)
class LossParams:
    """Hyper-parameters of the objective for one call (names follow TRL's GRPOConfig); built and
    validated by `grpo_fast.loss.arguments.loss_params`."""

    loss_type: str
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    importance_sampling_level: str = "token"
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    use_bias_correction_kl: bool = True
    top_entropy_quantile: float = 1.0
    entropy_threshold: float | Tensor | None = None  # the step's quantile; None: this call's
    entropy_coef: float = 0.0
    off_policy_mask_threshold: float | None = None
    sampling_correction: str = "none"
    sampling_correction_clip_min: float | None = None
    sampling_correction_clip_max: float | None = 3.0
    max_completion_length: int | None = None
    num_items_in_batch: float | Tensor | None = None
    num_sequences_in_batch: float | Tensor | None = None
    num_entropy_items_in_batch: float | Tensor | None = None


class PolicyInputs(NamedTuple):
    """What the objective needs besides the params; every tensor [B, T] unless noted."""

    logp: Tensor                # fp32, differentiable; 0 where mask = 0
    mask: Tensor                # fp32 in {0, 1}
    advantages: Tensor          # [B] fp32
    old_logp: Tensor | None     # fp32; None = on-policy
    ref_logp: Tensor | None     # fp32; needed when beta != 0
    entropy: Tensor | None      # fp32; differentiable when entropy_coef != 0, else a metric
    sampling_logp: Tensor | None = None  # fp32, the sampler's log-probs of the same tokens


class Ratios(NamedTuple):
    """The ratios a surrogate may read."""

    coef_1: Tensor              # [B, T] or [B, 1]: exp(clamped log w)
    log_ratio: Tensor           # [B, T]: logp - old, token level, unclamped
    sampling_ratio: Tensor | None  # [B, T] or [B, 1]: the sampler correction ρ (no grad), or None


class Surrogate(NamedTuple):
    per_token_loss: Tensor      # [B, T] or [B, 1]
    metrics: dict               # the loss type's own metrics (TRL's names), detached 0-dim


# ---------------------------------------------------------------- metric helpers


def _nonempty(mask: Tensor) -> Tensor:
    return (mask.sum(-1, keepdim=True) > 0).to(mask.dtype)  # [B, 1]


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Token mean for [B, T]; for [B, 1] (sequence level) the mean over non-empty sequences."""
    if x.shape[-1] == 1 and mask.shape[-1] != 1:
        mask = _nonempty(mask)
    x = x.to(torch.float32).expand_as(mask) if x.shape != mask.shape else x.to(torch.float32)
    return ((x * mask).sum() / mask.sum().clamp(min=1.0)).detach()


def _sequence_means(x: Tensor, mask: Tensor) -> Tensor:
    """Per non-empty sequence: the mean over its tokens ([B, T]) or its value ([B, 1])."""
    keep = mask.sum(-1) > 0  # [B]
    x = x.to(torch.float32)
    per_seq = x.squeeze(-1) if x.shape[-1] == 1 else (x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return per_seq[keep].detach()


def _min_or_zero(x: Tensor) -> Tensor:
    return x.min() if x.numel() else x.new_zeros(())


def _max_or_zero(x: Tensor) -> Tensor:
    return x.max() if x.numel() else x.new_zeros(())


# ---------------------------------------------------------------- per-token surrogates


def clipped_surrogate(t: Ratios, logp: Tensor, adv: Tensor, mask: Tensor, cfg: LossParams) -> Surrogate:
    """PPO clip: -min(c1' A, clamp(c1, 1-ε_low, 1+ε_high) A); c1' = min(c1, δ) if δ is set."""
    coef_1 = t.coef_1
    coef_2 = coef_1.clamp(1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    coef_1_capped = coef_1.clamp(max=cfg.delta) if cfg.delta is not None else coef_1
    loss = -torch.minimum(coef_1_capped * adv, coef_2 * adv)
    low = (coef_1 < 1 - cfg.epsilon_low) & (adv < 0)
    high = (coef_1 > 1 + cfg.epsilon_high) & (adv > 0)
    metrics = {"clip_ratio/low": masked_mean(low, mask), "clip_ratio/high": masked_mean(high, mask),
               "clip_ratio/region": masked_mean(low | high, mask),
               "clip_ratio/low_min": _min_or_zero(_sequence_means(low, mask)),
               "clip_ratio/high_max": _max_or_zero(_sequence_means(high, mask))}
    return Surrogate(loss, metrics)


def cispo_surrogate(t: Ratios, logp: Tensor, adv: Tensor, mask: Tensor, cfg: LossParams) -> Surrogate:
    """CISPO (MiniMax-M1): -sg[min(c1, ε_high)] A logp; the weight is clipped, not the update."""
    weight = t.coef_1.clamp(max=cfg.epsilon_high).detach()
    clipped = (t.coef_1 > cfg.epsilon_high) & (adv > 0)
    return Surrogate(-weight * adv * logp, {"cispo_clip_ratio": masked_mean(clipped, mask)})


def sapo_surrogate(t: Ratios, logp: Tensor, adv: Tensor, mask: Tensor, cfg: LossParams) -> Surrogate:
    """SAPO: -(4/τ) σ(τ (c1 - 1)) A, τ = τ_pos for A > 0 else τ_neg; a soft gate, no clipping."""
    tau = torch.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
    return Surrogate(-(4.0 / tau) * torch.sigmoid(tau * (t.coef_1 - 1)) * adv, {})


@torch.no_grad()
def vespo_weights(log_ratio: Tensor, mask: Tensor, adv: Tensor, sampling_ratio: Tensor | None,
                  cfg: LossParams) -> Tensor:
    """φ(W_b) [B, 1] (no grad): the Gamma weight of the sequence's importance weight W_b.

    log W_b = clamp(Σ_t m clamp(r, ±20) + Σ_t clamp(log ρ, log 1e-8, 20), log 1e-8, 20)
    φ = exp(λ + k log W - λ W), (k, λ) by the sign of A (A ≥ 0: the positive pair); φ(1) = 1.
    """
    seq = (log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP) * mask).sum(-1, keepdim=True)  # [B, 1]
    if sampling_ratio is not None:
        seq = seq + torch.log(sampling_ratio).clamp(VESPO_LOG_W_MIN, LOG_RATIO_CLAMP).sum(-1, keepdim=True)
    log_w = seq.clamp(VESPO_LOG_W_MIN, LOG_RATIO_CLAMP)
    nonneg = adv >= 0
    k = torch.where(nonneg, cfg.vespo_k_pos, cfg.vespo_k_neg)
    lam = torch.where(nonneg, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def vespo_surrogate(t: Ratios, logp: Tensor, adv: Tensor, mask: Tensor, cfg: LossParams) -> Surrogate:
    """VESPO: -sg[φ(W_b)] A logp, a smooth Gamma weighting of the sequence weight (no clipping)."""
    phi = vespo_weights(t.log_ratio, mask, adv, t.sampling_ratio, cfg)  # [B, 1]
    return Surrogate(-phi * adv * logp, {"vespo/phi_seq_mean": masked_mean(phi, mask)})


# ---------------------------------------------------------------- aggregations


def _num_sequences(mask: Tensor, cfg: LossParams):
    """S, at least 1: an empty batch (B = 0) sums to 0 and must give a loss of 0, not 0 / 0."""
    n = mask.shape[0] if cfg.num_sequences_in_batch is None else cfg.num_sequences_in_batch
    return n.clamp(min=1) if isinstance(n, Tensor) else max(n, 1)


def _at_least_one(n) -> Tensor | float:
    return n.clamp(min=1.0) if isinstance(n, Tensor) else max(float(n), 1.0)


def sequence_mean(ptl: Tensor, mask: Tensor, cfg: LossParams) -> Tensor:
    """Σ_b [Σ_t m ℓ / max(1, Σ_t m)] / S: each sequence weighs the same (grpo, sapo, GSPO)."""
    per_seq = (ptl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # [B]
    return per_seq.sum() / _num_sequences(mask, cfg)


def sequence_token_sum(ptl: Tensor, mask: Tensor, cfg: LossParams) -> Tensor:
    """Σ_bt m ℓ / S: each sequence weighs its length (luspo)."""
    return (ptl * mask).sum() / _num_sequences(mask, cfg)


def token_sum_over_items(ptl: Tensor, mask: Tensor, cfg: LossParams) -> Tensor:
    """Σ_bt m ℓ / max(1, N), N = tokens of the whole step (bnpo, dapo, cispo, vespo)."""
    n = mask.sum() if cfg.num_items_in_batch is None else cfg.num_items_in_batch
    return (ptl * mask).sum() / _at_least_one(n)


def token_sum_over_constant(ptl: Tensor, mask: Tensor, cfg: LossParams) -> Tensor:
    """Σ_bt m ℓ / (S · L_max): a constant normalizer, no length bias (dr_grpo)."""
    length = mask.shape[1] if cfg.max_completion_length is None else cfg.max_completion_length
    return (ptl * mask).sum() / (_num_sequences(mask, cfg) * max(length, 1))


class LossType(NamedTuple):
    surrogate: Callable[[Ratios, Tensor, Tensor, Tensor, LossParams], Surrogate]
    aggregate: Callable[[Tensor, Tensor, LossParams], Tensor]


LOSS_TYPES: dict[str, LossType] = {
    "grpo": LossType(clipped_surrogate, sequence_mean),
    "bnpo": LossType(clipped_surrogate, token_sum_over_items),
    "dr_grpo": LossType(clipped_surrogate, token_sum_over_constant),
    "dapo": LossType(clipped_surrogate, token_sum_over_items),
    "cispo": LossType(cispo_surrogate, token_sum_over_items),
    "sapo": LossType(sapo_surrogate, sequence_mean),
    "luspo": LossType(clipped_surrogate, sequence_token_sum),
    "vespo": LossType(vespo_surrogate, token_sum_over_items),
}
assert tuple(LOSS_TYPES) == LOSS_TYPE_NAMES
assert set(CLIPPED_LOSS_TYPES) == {k for k, v in LOSS_TYPES.items() if v.surrogate is clipped_surrogate}


# ---------------------------------------------------------------- shared terms


def log_importance_weights(log_ratio: Tensor, mask: Tensor, level: str) -> Tensor:
    """log c1 before the clamp: [B, T] at token level, [B, 1] at sequence level (GSPO)."""
    if level == "token":
        return log_ratio
    return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # [B, 1]


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """exp(d) - d - 1 with d = ref - logp (≥ 0, unbiased for KL(π‖π_ref)), fp32.

    Only exp's argument is clamped, from above (no overflow): below, k3 is linear in d and its
    gradient 1 - exp(d) stays exact however far the policy has drifted.
    """
    d = ref_logp - logp
    return torch.exp(d.clamp(max=LOG_RATIO_CLAMP)) - d - 1


def quantile(values: Tensor, q: float) -> Tensor:
    """torch.quantile (linear interpolation) of a 1-D tensor, also past its 2**24-element limit."""
    if values.numel() <= 2**24:
        return torch.quantile(values, q)
    s = values.sort().values
    pos = q * (s.numel() - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, s.numel() - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def entropy_threshold(entropy: Tensor, mask: Tensor, top_entropy_quantile: float) -> Tensor | None:
    """The high-entropy threshold: the (1 - ρ) quantile of the entropies of the tokens with mask
    != 0 (TRL's get_high_entropy_mask); None when there are none. Call it on the whole step's
    entropies and pass the result as `entropy_threshold`, so micro-batches share it (the
    trainer passes step_entropy_threshold's, see there)."""
    values = entropy.detach()[mask != 0].float()
    if values.numel() == 0:
        return None
    return quantile(values, 1.0 - top_entropy_quantile)


def step_entropy_threshold(values: Tensor, top_entropy_quantile: float) -> Tensor | None:
    """entropy_threshold for a threshold that another forward will apply: the same kept set
    (values >= the quantile), with the threshold moved down to the middle of the gap below the
    smallest kept value. values: [N] the step's entropies of the loss's tokens.

    Why: the quantile is often one token's own entropy (the median of an odd count), and the loss
    pass recomputes that entropy in another forward (other micro-batch shapes, other GEMM
    blocking), a rounding away from the scoring pass's value: at the quantile itself that token
    would be kept or dropped depending on how the step was split. Midway in the gap, only a true
    tie at rounding level can still flip."""
    q = entropy_threshold(values, torch.ones_like(values), top_entropy_quantile)
    if q is None:
        return None
    below = values[values < q]
    if below.numel() == 0:
        return q  # every value is kept: nothing to separate from
    smallest_kept = values[values >= q].min()
    return (below.max() + smallest_kept) / 2


def high_entropy_mask(entropy: Tensor, mask: Tensor, cfg: LossParams) -> Tensor | None:
    """[B, T] bool: tokens whose entropy is at least the threshold (None when ρ = 1: all)."""
    if cfg.top_entropy_quantile >= 1.0:
        return None
    threshold = cfg.entropy_threshold
    if threshold is None:
        threshold = entropy_threshold(entropy, mask, cfg.top_entropy_quantile)
        if threshold is None:
            return torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
    return (entropy.detach() >= threshold) & (mask != 0)


def off_policy_mask(inp: PolicyInputs, old: Tensor, adv: Tensor, cfg: LossParams) -> Tensor:
    """[B, 1] 0/1: keep a sequence when A ≥ 0 or its mean sampler-vs-current log-ratio
    Σ_t m (s - logp) / max(1, Σ_t m) ≤ δ; s = the sampler's log-probs (else old)."""
    behaviour = inp.sampling_logp if inp.sampling_logp is not None else old
    kl = torch.nan_to_num(behaviour - inp.logp.detach(), nan=0.0)  # unscored tokens: no evidence
    mean_kl = (kl * inp.mask).sum(-1, keepdim=True) / inp.mask.sum(-1, keepdim=True).clamp(min=1.0)
    return ((adv >= 0) | (mean_kl <= cfg.off_policy_mask_threshold)).to(inp.mask.dtype)


class SamplerTerms(NamedTuple):
    ratio: Tensor | None        # the correction ρ, [B, T] (token_*) or [B, 1] (sequence_*); None: off
    metrics: dict


@torch.no_grad()
def sampler_terms(inp: PolicyInputs, cfg: LossParams) -> SamplerTerms | None:
    """The sampler's log-probs against the trainer's on-policy ones π = old (else logp): TRL's
    `sampling/*` metrics and, with a correction mode, the ratio ρ that multiplies the loss.

    log ρ = m (π - s) per token, or Σ_t m (π - s) per sequence; *_truncate clamps ρ to
    [clip_min, clip_max], *_mask zeroes it outside; tokens the sampler could not score (NaN)
    count as agreement. Metrics: |π - s| mean / max over scored tokens, and ρ's min / mean / max
    (the corrected ρ with a mode on, as TRL logs it; the implied token ratio without).
    """
    if inp.sampling_logp is None:
        return None
    mask = inp.mask
    trainer = inp.logp.detach() if inp.old_logp is None else inp.old_logp
    diff = trainer - inp.sampling_logp  # [B, T]
    scored = (mask != 0) & ~torch.isnan(diff)
    delta = diff.abs()[scored]
    log_r = torch.nan_to_num(diff * mask, nan=0.0)  # [B, T]
    mode = cfg.sampling_correction
    if mode.startswith("sequence"):
        log_r = log_r.sum(-1, keepdim=True)  # [B, 1]
    lo = math.log(cfg.sampling_correction_clip_min) if cfg.sampling_correction_clip_min else -math.inf
    hi = math.log(cfg.sampling_correction_clip_max) if cfg.sampling_correction_clip_max is not None else math.inf
    ratio = None
    if mode.endswith("truncate"):
        ratio = torch.exp(log_r.clamp(max(lo, -LOG_RATIO_CLAMP), min(hi, LOG_RATIO_CLAMP)))
    elif mode.endswith("mask"):
        inside = (log_r >= lo) & (log_r <= hi)
        ratio = torch.where(inside, torch.exp(log_r.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)), 0.0)
    shown = ratio if ratio is not None else torch.exp(log_r.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    flat = shown.flatten() if shown.shape[-1] == 1 else shown[mask != 0]
    zero = mask.new_zeros(())
    metrics = {
        "sampling/sampling_logp_difference/mean": delta.mean() if delta.numel() else zero,
        "sampling/sampling_logp_difference/max": _max_or_zero(delta),
        "sampling/importance_sampling_ratio/min": _min_or_zero(flat),
        "sampling/importance_sampling_ratio/mean": flat.mean() if flat.numel() else zero,
        "sampling/importance_sampling_ratio/max": _max_or_zero(flat),
    }
    return SamplerTerms(ratio, metrics)


# ---------------------------------------------------------------- the objective


def grpo_objective(inp: PolicyInputs, cfg: LossParams) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss (0-dim fp32, differentiable through `inp.logp` and, with the entropy bonus,
    `inp.entropy`) and metrics (0-dim, detached).

    Metrics: "kl" (mean of the per-token KL term, × c1 with the bias correction as TRL logs it;
    0 without ref log-probs), "entropy" (mean over tokens), "ratio" (mean c1), "num_tokens" (Σ
    mask); the loss type's own, as TRL names them: clip_ratio/{low, high, region} (fractions of
    tokens, or of non-empty sequences at sequence level, clipped where it matters: below 1-ε_low
    with A < 0, above 1+ε_high with A > 0) with clip_ratio/low_min and high_max (over sequences)
    for the clipped types, cispo_clip_ratio (c1 > ε_high with A > 0), vespo/phi_seq_mean, none for
    sapo. With the options: sampling/* (`sampler_terms`), off_policy_mask/dropped (fraction of
    non-empty sequences dropped), entropy/high and num_high_entropy_tokens (mean entropy and
    count of the tokens the high-entropy mask keeps), policy_loss (the loss before the entropy
    bonus).
    """
    variant = LOSS_TYPES[cfg.loss_type]
    logp, mask = inp.logp, inp.mask
    if inp.entropy is None and (cfg.top_entropy_quantile < 1.0 or cfg.entropy_coef != 0.0):
        raise ValueError("top_entropy_quantile < 1 and entropy_coef != 0 need the per-token entropies")
    adv = inp.advantages.unsqueeze(-1)  # [B, 1]
    old = logp.detach() if inp.old_logp is None else inp.old_logp

    log_ratio = logp - old  # [B, T]
    log_w = log_importance_weights(log_ratio, mask, cfg.importance_sampling_level)
    coef_1 = torch.exp(log_w.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # [B, T] or [B, 1]
    sampler = sampler_terms(inp, cfg)
    sampling_ratio = sampler.ratio if sampler is not None else None
    sur = variant.surrogate(Ratios(coef_1, log_ratio, sampling_ratio), logp, adv, mask, cfg)
    per_token_loss = sur.per_token_loss.expand_as(logp)  # [B, T]

    metrics: dict[str, Tensor] = {}
    if cfg.off_policy_mask_threshold is not None:
        keep = off_policy_mask(inp, old, adv, cfg)  # [B, 1]
        per_token_loss = per_token_loss * keep
        metrics["off_policy_mask/dropped"] = masked_mean(1.0 - keep, mask)
    high = high_entropy_mask(inp.entropy, mask, cfg) if inp.entropy is not None else None  # [B, T] bool | None
    if high is not None:
        per_token_loss = per_token_loss * high
    if sampling_ratio is not None and cfg.loss_type != "vespo":
        per_token_loss = per_token_loss * sampling_ratio

    kl = k3_kl(logp, inp.ref_logp) if inp.ref_logp is not None else None  # [B, T]
    if kl is not None and cfg.use_bias_correction_kl:
        kl = kl * coef_1
    if cfg.beta != 0.0:
        per_token_loss = per_token_loss + cfg.beta * kl
    loss = variant.aggregate(per_token_loss, mask, cfg)

    kept = mask if high is None else mask * high  # the tokens the entropy bonus acts on
    if cfg.entropy_coef != 0.0:
        n = kept.sum() if cfg.num_entropy_items_in_batch is None else cfg.num_entropy_items_in_batch
        metrics["policy_loss"] = loss.detach()
        loss = loss - cfg.entropy_coef * (inp.entropy * kept).sum() / _at_least_one(n)

    zero = torch.zeros((), dtype=torch.float32, device=logp.device)
    metrics.update({
        "kl": masked_mean(kl, mask) if kl is not None else zero,
        "entropy": masked_mean(inp.entropy, mask) if inp.entropy is not None else zero,
        "ratio": masked_mean(coef_1, mask),
        **sur.metrics,
        "num_tokens": mask.sum().detach(),
    })
    if high is not None:
        metrics["entropy/high"] = masked_mean(inp.entropy, kept)
        metrics["num_high_entropy_tokens"] = kept.sum().detach()
    if sampler is not None:
        metrics.update(sampler.metrics)
    return loss, metrics
