"""The loss table and every option with values worked out by hand, and the reference loss against
an independent transcription of TRL 1.16's `_compute_loss`."""
import inspect
import math

import pytest
import torch

from grpo_fast.loss import LOSS_TYPE_NAMES, reference_grpo_loss
from grpo_fast.loss.objective import LOSS_TYPES, LossParams, PolicyInputs, entropy_threshold, grpo_objective
from grpo_fast.ops import fused_grpo_loss

E = math.e


def one_token(log_ratio, adv, loss_type, ref_delta=None, **cfg):
    """A single token with logp = 0 and old = -log_ratio; returns (loss, dloss/dlogp, metrics)."""
    logp = torch.zeros(1, 1, requires_grad=True)
    ref = None if ref_delta is None else torch.tensor([[ref_delta]])
    inp = PolicyInputs(logp, torch.ones(1, 1), torch.tensor([float(adv)]),
                       torch.tensor([[-float(log_ratio)]]), ref, None)
    loss, metrics = grpo_objective(inp, LossParams(loss_type=loss_type, **cfg))
    loss.backward()
    return loss.item(), logp.grad.item(), metrics


def test_loss_type_names_are_defined_once():
    from grpo_fast import config

    assert tuple(LOSS_TYPES) == LOSS_TYPE_NAMES
    assert config.LOSS_TYPE_NAMES is LOSS_TYPE_NAMES  # the run config reads the same tuple
    assert set(LOSS_TYPE_NAMES) >= {"grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"}


def test_fused_and_reference_signatures_stay_identical():
    ref = inspect.signature(reference_grpo_loss).parameters
    fused = dict(inspect.signature(fused_grpo_loss).parameters)
    assert fused.pop("backend").default is None
    assert list(ref.items()) == list(fused.items())  # names, kinds, defaults and order


def test_ratio_e_is_clipped_to_1_2_for_positive_advantage():
    loss, grad, m = one_token(1.0, adv=1.0, loss_type="grpo")
    assert loss == pytest.approx(-1.2)
    assert grad == 0.0  # clipped: no gradient
    assert (m["clip_ratio/high"].item(), m["clip_ratio/low"].item()) == (1.0, 0.0)
    assert (m["clip_ratio/high_max"].item(), m["clip_ratio/low_min"].item()) == (1.0, 0.0)
    assert m["ratio"].item() == pytest.approx(E)


def test_ratio_e_with_negative_advantage_is_not_clipped():
    loss, grad, m = one_token(1.0, adv=-1.0, loss_type="dapo")
    assert loss == pytest.approx(E)  # -min(-e, -1.2) = e
    assert grad == pytest.approx(E)  # d(e^r)/dlogp
    assert m["clip_ratio/region"].item() == 0.0


def test_ratio_half_clipped_from_below_with_negative_advantage():
    loss, grad, m = one_token(math.log(0.5), adv=-1.0, loss_type="bnpo")
    assert loss == pytest.approx(0.8)  # -min(-0.5, -0.8)
    assert grad == 0.0
    assert (m["clip_ratio/low"].item(), m["clip_ratio/region"].item()) == (1.0, 1.0)


def test_epsilon_high_and_delta():
    loss, _, _ = one_token(1.0, adv=1.0, loss_type="grpo", epsilon_high=0.28)
    assert loss == pytest.approx(-1.28)
    # Two-sided clip: with A < 0 the unclipped ratio e is capped at delta = 2.
    loss, grad, _ = one_token(1.0, adv=-1.0, loss_type="grpo", delta=2.0)
    assert loss == pytest.approx(2.0)
    assert grad == 0.0


def test_cispo_clips_the_weight_not_the_gradient():
    # weight = sg(min(e, 2)) = 2; loss = -2 * A * logp with logp = 0; d/dlogp = -2 A.
    loss, grad, m = one_token(1.0, adv=1.5, loss_type="cispo", epsilon_high=2.0)
    assert loss == 0.0
    assert grad == pytest.approx(-3.0)
    assert set(m) >= {"cispo_clip_ratio"} and "clip_ratio/low" not in m  # TRL's metric names
    assert m["cispo_clip_ratio"].item() == 1.0


def test_sapo_soft_gate():
    # On-policy ratio 1: σ(0) = 1/2 → loss = -(4/τ)(1/2)A; d/dlogp = -(4/τ) σ'(0) τ A = -A.
    loss, grad, m = one_token(0.0, adv=1.0, loss_type="sapo")
    assert (loss, grad) == (pytest.approx(-2.0), pytest.approx(-1.0))
    assert not any(k.startswith("clip_ratio") for k in m)
    loss, grad, _ = one_token(0.0, adv=-1.0, loss_type="sapo", sapo_temperature_neg=2.0)  # τ_neg = 2
    assert (loss, grad) == (pytest.approx(1.0), pytest.approx(1.0))


@pytest.mark.parametrize("bias_correction", [False, True])
def test_k3_kl_term(bias_correction):
    # ref - logp = 1, on-policy: kl = e - 2; d kl / d logp = 1 - e. With the bias correction the
    # term is kl · c1, c1 = exp(logp - sg(logp)) = 1 in value, so its gradient adds kl · 1.
    loss, grad, m = one_token(0.0, adv=0.0, loss_type="dapo", ref_delta=1.0, beta=0.5,
                              use_bias_correction_kl=bias_correction)
    assert loss == pytest.approx(0.5 * (E - 2))
    assert grad == pytest.approx(0.5 * (1 - E) + (0.5 * (E - 2) if bias_correction else 0.0))
    assert m["kl"].item() == pytest.approx(E - 2)


def test_bias_corrected_kl_off_policy_by_hand():
    # log ratio ln 2 (c1 = 2), ref - logp = 1: term = β kl c1 = 0.5 (e - 2) 2; its gradient
    # 0.5 (c1 (1 - e) + kl c1) = 0.5 · 2 (1 - e + e - 2) = -1 (plus the clipped surrogate's 0: A = 0).
    loss, grad, m = one_token(math.log(2.0), adv=0.0, loss_type="dapo", ref_delta=1.0, beta=0.5)
    assert loss == pytest.approx(0.5 * (E - 2) * 2)
    assert grad == pytest.approx(-1.0)
    assert m["kl"].item() == pytest.approx((E - 2) * 2)  # TRL logs the corrected term


def test_k3_gradient_survives_extreme_drift():
    """ref - logp = -30 (the policy far above the reference): k3 ≈ -d - 1 is linear there and its
    gradient 1 - e^d ≈ 1. Clamping d from below (the old code) made it exactly 0."""
    loss, grad, m = one_token(0.0, adv=0.0, loss_type="dapo", ref_delta=-30.0, beta=1.0,
                              use_bias_correction_kl=False)
    assert loss == pytest.approx(29.0, rel=1e-6)
    assert grad == pytest.approx(1.0, rel=1e-6)
    # Above, exp's argument is clamped: finite, and still the linear part's gradient.
    loss, grad, _ = one_token(0.0, adv=0.0, loss_type="dapo", ref_delta=500.0, beta=1.0,
                              use_bias_correction_kl=False)
    assert math.isfinite(loss) and grad == pytest.approx(1.0)


def two_sequences(loss_type, level="token", **cfg):
    """Sequence 0: ratios (1, 2), sequence 1: ratio 4 then a masked token; A = -1 for both, so
    each token's clipped loss is max(ratio, 1.2 clip) = its ratio: 1, 2, 4."""
    logp = torch.zeros(2, 2, requires_grad=True)
    old = -torch.log(torch.tensor([[1.0, 2.0], [4.0, 1.0]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    inp = PolicyInputs(logp, mask, torch.tensor([-1.0, -1.0]), old, None, None)
    cfg = LossParams(loss_type=loss_type, importance_sampling_level=level, **cfg)
    return grpo_objective(inp, cfg)


@pytest.mark.parametrize(
    "loss_type, cfg, expected",
    [
        ("grpo", {}, (1.5 + 4) / 2),  # mean of per-sequence means
        ("grpo", {"num_sequences_in_batch": 4}, (1.5 + 4) / 4),
        ("bnpo", {}, 7 / 3),
        ("dapo", {}, 7 / 3),
        ("dapo", {"num_items_in_batch": 10}, 7 / 10),
        ("dr_grpo", {}, 7 / (2 * 2)),  # S · T
        ("dr_grpo", {"max_completion_length": 4, "num_sequences_in_batch": 3}, 7 / (3 * 4)),
        ("luspo", {}, 7 / 2),  # token sums per sequence, averaged over sequences
        ("luspo", {"num_sequences_in_batch": 7}, 7 / 7),
    ],
)
def test_aggregation_normalizers(loss_type, cfg, expected):
    loss, metrics = two_sequences(loss_type, **cfg)
    assert loss.item() == pytest.approx(expected)
    assert metrics["num_tokens"].item() == 3
    assert metrics["ratio"].item() == pytest.approx(7 / 3)


def test_gspo_sequence_level_ratio():
    # Sequence-level log ratio = mean over the sequence's tokens: (0 + ln 2)/2 → ratio √2 for seq 0,
    # ln 4 → 4 for seq 1. grpo aggregation: (√2 + 4) / 2; ratio metric averages sequences.
    loss, m = two_sequences("grpo", level="sequence")
    assert loss.item() == pytest.approx((math.sqrt(2) + 4) / 2)
    assert m["ratio"].item() == pytest.approx((math.sqrt(2) + 4) / 2)
    assert m["clip_ratio/region"].item() == 0.0  # A < 0 and ratio > 1: never clipped
    # luspo at sequence level: each sequence's ratio times its length, over S = 2.
    loss, _ = two_sequences("luspo", level="sequence")
    assert loss.item() == pytest.approx((2 * math.sqrt(2) + 4) / 2)


def vespo_case(log_ratios, adv, **cfg):
    """One sequence with logp = 0 and the given per-token log-ratios; returns (loss, grad, metrics)."""
    logp = torch.zeros(1, len(log_ratios), requires_grad=True)
    inp = PolicyInputs(logp, torch.ones(1, len(log_ratios)), torch.tensor([float(adv)]),
                       -torch.tensor([log_ratios]), None, None)
    loss, m = grpo_objective(inp, LossParams(loss_type="vespo", **cfg))
    loss.backward()
    return loss.item(), logp.grad[0].tolist(), m


@pytest.mark.parametrize("log_ratios, adv, phi", [
    ((0.5, -0.5), 1.0, 1.0),                               # W = 1: φ(1) = 1 for either sign
    ((0.5, 0.5), 2.0, math.exp(3 + 2 * 1 - 3 * E)),         # W = e, A ≥ 0: k = 2, λ = 3
    ((-0.5, -0.5), -1.0, math.exp(2 + 3 * -1 - 2 / E)),     # W = 1/e, A < 0: k = 3, λ = 2
    ((30.0, 0.0), 1.0, 0.0),                               # W clamped at e^20: φ underflows to 0
])
def test_vespo_gamma_weight_by_hand(log_ratios, adv, phi):
    """ℓ = -sg[φ(W)] A logp with W = exp(Σ_t r_t): at logp = 0 the loss is 0 and each token's
    gradient is -φ A / N (dapo's normalizer, N = 2 tokens)."""
    loss, grad, m = vespo_case(log_ratios, adv)
    assert loss == 0.0
    assert grad == pytest.approx([-phi * adv / 2] * 2, rel=1e-6, abs=1e-12)  # fp32
    assert m["vespo/phi_seq_mean"].item() == pytest.approx(phi, rel=1e-6, abs=1e-12)


def test_vespo_parameters_and_sampler_ratio():
    # k_pos = 1, λ_pos = 1, W = e: φ = exp(1 + 1 - e).
    _, grad, _ = vespo_case((1.0,), 1.0, vespo_k_pos=1.0, vespo_lambda_pos=1.0)
    assert grad[0] == pytest.approx(-math.exp(2 - E))
    # A token-level sampler correction ρ enters W: log W = Σ r + Σ log ρ. Trainer = sampler + 1
    # on the token (truncate at 10 keeps ρ = e): W = e · e with r = 1.
    logp = torch.zeros(1, 1, requires_grad=True)
    inp = PolicyInputs(logp, torch.ones(1, 1), torch.tensor([1.0]), torch.tensor([[-1.0]]), None, None,
                       sampling_logp=torch.tensor([[-1.0 - 1.0]]))
    loss, m = grpo_objective(inp, LossParams(loss_type="vespo", sampling_correction="token_truncate",
                                             sampling_correction_clip_max=10.0))
    loss.backward()
    assert logp.grad.item() == pytest.approx(-math.exp(3 + 2 * 2 - 3 * E * E))


def test_off_policy_sequence_mask_by_hand():
    """Seq 0 (A = -1) and seq 1 (A = +1), both with the sampler's log-probs 1 nat above the current
    policy (mean log-ratio 1 > δ = 0.5): only the negative-advantage sequence is dropped."""
    logp = torch.zeros(2, 2, requires_grad=True)
    mask = torch.ones(2, 2)
    inp = PolicyInputs(logp, mask, torch.tensor([-1.0, 1.0]), None, None, None, sampling_logp=torch.ones(2, 2))
    loss, m = grpo_objective(inp, LossParams(loss_type="dapo", off_policy_mask_threshold=0.5))
    loss.backward()
    assert loss.item() == pytest.approx(-2 / 4)  # seq 1: -A per token, over the 4 tokens of the step
    assert logp.grad[0].tolist() == [0.0, 0.0] and logp.grad[1].tolist() == [-0.25, -0.25]
    assert m["off_policy_mask/dropped"].item() == 0.5
    loss, _ = grpo_objective(inp._replace(logp=logp.detach()), LossParams(loss_type="dapo", off_policy_mask_threshold=1.0))
    assert loss.item() == pytest.approx(0.0)  # δ = 1: mean log-ratio 1 ≤ δ keeps both (-2 + 2) / 4


def entropy_case(**cfg):
    """Four tokens with entropies 0.1, 0.5, 0.9, 1.3 (differentiable), on-policy, A = 1."""
    logp = torch.zeros(1, 4, requires_grad=True)
    entropy = torch.tensor([[0.1, 0.5, 0.9, 1.3]], requires_grad=True)
    inp = PolicyInputs(logp, torch.ones(1, 4), torch.tensor([1.0]), None, None, entropy)
    loss, m = grpo_objective(inp, LossParams(loss_type="dapo", **cfg))
    loss.backward()
    return loss.item(), logp.grad[0].tolist(), None if entropy.grad is None else entropy.grad[0].tolist(), m


def test_high_entropy_mask_by_hand():
    # ρ = 0.5: threshold = median = 0.7; tokens 3 and 4 keep their -A ratio, over N = 4 tokens.
    loss, g_logp, _, m = entropy_case(top_entropy_quantile=0.5)
    assert loss == pytest.approx(-2 / 4)
    assert g_logp == [0.0, 0.0, -0.25, -0.25]
    assert m["entropy/high"].item() == pytest.approx(1.1) and m["num_high_entropy_tokens"].item() == 2
    assert m["entropy"].item() == pytest.approx(0.7)  # all tokens, as TRL logs it
    assert entropy_threshold(torch.tensor([[0.1, 0.5, 0.9, 1.3]]), torch.ones(1, 4), 0.5).item() == pytest.approx(0.7)
    # A threshold given for the whole step overrides this call's quantile.
    _, g_logp, _, _ = entropy_case(top_entropy_quantile=0.5, entropy_threshold=0.3)
    assert g_logp == [0.0, -0.25, -0.25, -0.25]
    # ρ = 0: only the highest-entropy token.
    _, g_logp, _, _ = entropy_case(top_entropy_quantile=0.0)
    assert g_logp == [0.0, 0.0, 0.0, -0.25]


def test_entropy_bonus_by_hand():
    # L = -A·1 (mean of ratios) - c · mean entropy; d L / d H_t = -c / 4.
    loss, g_logp, g_ent, m = entropy_case(entropy_coef=0.1)
    assert loss == pytest.approx(-1.0 - 0.1 * 0.7)
    assert g_ent == pytest.approx([-0.025] * 4)
    assert m["policy_loss"].item() == pytest.approx(-1.0)
    # With the high-entropy mask the bonus acts on the kept tokens only, over the step's count N'.
    loss, _, g_ent, _ = entropy_case(entropy_coef=0.1, top_entropy_quantile=0.5, num_entropy_items_in_batch=4)
    assert loss == pytest.approx(-0.5 - 0.1 * (0.9 + 1.3) / 4)
    assert g_ent == pytest.approx([0.0, 0.0, -0.025, -0.025])


@pytest.mark.parametrize("mode, lo, hi, expected", [
    # trainer - sampler per token = (1, -1, ln 4); token ratios (e, 1/e, 4), sequence ratio 4.
    ("token_truncate", None, 2.0, [2.0, 1 / E, 2.0]),
    ("token_truncate", 0.5, 2.0, [2.0, 0.5, 2.0]),
    ("token_mask", 0.5, 3.0, [E, 0.0, 0.0]),
    ("sequence_truncate", None, 3.0, [3.0] * 3),
    ("sequence_mask", None, 5.0, [4.0] * 3),
    ("sequence_mask", None, 3.0, [0.0] * 3),
    ("none", None, 3.0, [1.0] * 3),
])
def test_sampler_correction_modes(mode, lo, hi, expected):
    """The correction multiplies each token's surrogate; with A = -1 on-policy the token loss is
    ρ_t · 1, so d L / d logp_t = ρ_t / 3 shows ρ (dapo over 3 tokens)."""
    logp = torch.zeros(1, 3, requires_grad=True)
    sampling = -torch.tensor([[1.0, -1.0, math.log(4.0)]])
    inp = PolicyInputs(logp, torch.ones(1, 3), torch.tensor([-1.0]), None, None, None, sampling_logp=sampling)
    loss, m = grpo_objective(inp, LossParams(loss_type="dapo", sampling_correction=mode,
                                             sampling_correction_clip_min=lo, sampling_correction_clip_max=hi))
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([x / 3 for x in expected])
    assert m["sampling/sampling_logp_difference/mean"].item() == pytest.approx((2 + math.log(4.0)) / 3)
    assert m["sampling/sampling_logp_difference/max"].item() == pytest.approx(math.log(4.0))
    shown = expected if mode != "none" else [E, 1 / E, 4.0]  # the implied token ratio without a mode
    if mode.startswith("sequence"):
        shown = expected[:1]
    assert m["sampling/importance_sampling_ratio/max"].item() == pytest.approx(max(shown))
    assert m["sampling/importance_sampling_ratio/min"].item() == pytest.approx(min(shown))


def test_sampler_metrics_use_old_logprobs_when_given():
    logp = torch.zeros(1, 2, requires_grad=True)
    inp = PolicyInputs(logp, torch.ones(1, 2), torch.tensor([1.0]), torch.full((1, 2), -0.5), None, None,
                       sampling_logp=torch.full((1, 2), -0.25))
    _, m = grpo_objective(inp, LossParams(loss_type="dapo"))
    assert m["sampling/sampling_logp_difference/mean"].item() == pytest.approx(0.25)
    # NaN = a token the sampler could not score: agreement, and left out of the difference.
    inp = inp._replace(sampling_logp=torch.tensor([[float("nan"), -0.5]]))
    _, m = grpo_objective(inp, LossParams(loss_type="dapo", sampling_correction="token_mask"))
    assert m["sampling/sampling_logp_difference/max"].item() == 0.0


def test_on_policy_ratio_is_one_with_gradient():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    inp = PolicyInputs(logp, torch.ones(1, 2), torch.tensor([2.0]), None, None, None)
    loss, m = grpo_objective(inp, LossParams(loss_type="dapo"))
    loss.backward()
    assert loss.item() == pytest.approx(-2.0)  # -ratio · A with ratio 1
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, -1.0]]))  # -A / 2 tokens
    assert m["ratio"].item() == 1.0


def test_huge_log_ratio_stays_finite():
    loss, grad, m = one_token(500.0, adv=-1.0, loss_type="dapo")
    assert math.isfinite(loss) and loss == pytest.approx(math.exp(20.0), rel=1e-5)
    assert grad == 0.0  # past the clamp


# ---------------------------------------------------------------- against TRL's formulas


def trl_style_loss(logits, targets, mask, adv, old, ref, loss_type, beta, eps_low, eps_high, delta, level, max_len,
                   sapo=(1.0, 1.05), vespo=(2.0, 3.0, 3.0, 2.0), bias_correction=True, top_q=1.0, entropy_coef=0.0,
                   off_policy=None, sampling=None, is_mode=None, is_max=3.0, is_min=None):
    """An independent transcription of TRL 1.16's GRPOTrainer._compute_loss (one process, one
    step, no accumulation), with its vLLM importance-sampling correction (from
    _generate_and_score_completions) when `is_mode` is set."""
    logp_all = torch.log_softmax(logits.float(), -1)
    logps = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropies = -(logp_all.exp() * logp_all).sum(-1)
    adv = adv.unsqueeze(1)
    old = logps.detach() if old is None else old
    is_ratio = None
    if is_mode is not None:
        diff = (old - sampling) * mask
        diff = diff.sum(-1, keepdim=True) if is_mode.startswith("sequence") else diff
        is_ratio = torch.exp(diff)
        if is_mode.endswith("truncate"):
            is_ratio = torch.clamp(is_ratio, min=is_min, max=is_max)
        else:
            bad = (is_ratio < (is_min if is_min is not None else -math.inf)) | (is_ratio > is_max)
            is_ratio = is_ratio.masked_fill(bad, 0.0)
    entropy_mask = None
    if top_q < 1.0:
        thr = torch.quantile(entropies[mask.bool()].float(), 1 - top_q)
        entropy_mask = ((entropies * mask) >= thr) & mask.bool()
    if off_policy is not None:
        kl_div = (sampling if sampling is not None else old) - logps.detach()
        avg = (kl_div * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
        off_mask = ((adv >= 0) | (avg <= off_policy)).float()
    log_ratio = logps - old
    if level == "token":
        liw = log_ratio
    else:
        liw = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(liw)
    if beta != 0.0:
        kl = torch.exp(ref - logps) - (ref - logps) - 1
        if bias_correction:
            kl = kl * coef_1
    if loss_type == "cispo":
        ptl = -torch.clamp(coef_1, max=eps_high).detach() * adv * logps
    elif loss_type == "sapo":
        temps = torch.where(adv > 0, sapo[0], sapo[1])
        ptl = -torch.sigmoid(temps * (coef_1 - 1)) * 4 / temps * adv
    elif loss_type == "vespo":
        with torch.no_grad():
            seq = torch.sum(torch.clamp(log_ratio, -20.0, 20.0) * mask, -1, keepdim=True)
            if is_ratio is not None:
                seq += torch.sum(torch.clamp(torch.log(is_ratio), math.log(1e-8), 20.0), -1, keepdim=True)
            log_w = torch.clamp(seq, math.log(1e-8), 20.0)
            k = torch.where(adv >= 0, vespo[0], vespo[2])
            lam = torch.where(adv >= 0, vespo[1], vespo[3]).clamp(min=1e-4)
            phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        ptl = -phi * adv * logps
    else:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        ptl = -torch.min(coef_1 * adv, coef_2 * adv)
    if off_policy is not None:
        ptl = ptl * off_mask
    if entropy_mask is not None:
        ptl = ptl * entropy_mask
    if is_ratio is not None and loss_type != "vespo":
        ptl = ptl * is_ratio
    if beta != 0.0:
        ptl = ptl + beta * kl
    if loss_type in ("grpo", "sapo"):
        loss = ((ptl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (ptl * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (ptl * mask).sum() / (ptl.size(0) * max_len)
    elif loss_type == "luspo":
        loss = (ptl * mask).sum(-1).mean()
    else:  # dapo, cispo, vespo: num_items_in_batch
        loss = (ptl * mask).sum() / mask.sum().clamp(min=1.0)
    if entropy_coef:
        eff = mask if entropy_mask is None else mask * entropy_mask
        loss = loss - entropy_coef * (entropies * eff).sum() / eff.sum().clamp(min=1.0)
    return loss


def trl_case(seed=1, B=3, T=5, H=8, V=23):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g) * 0.5
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[0, 0] = 1.0
    adv = torch.randn(B, generator=g)
    with torch.no_grad():
        lp = torch.log_softmax(hidden @ weight.T / 0.8, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    old = lp + 0.3 * torch.randn(B, T, generator=g)
    ref = lp + 0.3 * torch.randn(B, T, generator=g)
    sampling = old + 0.2 * torch.randn(B, T, generator=g)
    return hidden, weight, targets, mask, adv, old, ref, sampling


def assert_matches_trl(ours_kw, trl_kw, seed=1):
    hidden, weight, targets, mask, adv, old, ref, _ = trl_case(seed)
    ours, _ = reference_grpo_loss(hidden, weight, targets, mask, adv, old, ref, temperature=0.8,
                                  max_completion_length=7, **ours_kw)
    (g_ours,) = torch.autograd.grad(ours, hidden)
    theirs = trl_style_loss(hidden @ weight.T / 0.8, targets, mask, adv, old, ref, max_len=7, **trl_kw)
    (g_theirs,) = torch.autograd.grad(theirs, hidden)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore:.*(luspo|vespo|weighs each sequence)")  # TRL's warnings: tested below
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPE_NAMES)
def test_reference_matches_trl(loss_type, level):
    eps_high = 3.0 if loss_type == "cispo" else 0.28
    delta = 1.5 if loss_type in ("grpo", "luspo") else None
    assert_matches_trl(dict(loss_type=loss_type, beta=0.04, epsilon_high=eps_high, delta=delta,
                            importance_sampling_level=level),
                       dict(loss_type=loss_type, beta=0.04, eps_low=0.2, eps_high=eps_high, delta=delta, level=level))


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "vespo"])
@pytest.mark.parametrize("options", [
    dict(ours=dict(use_bias_correction_kl=False), trl=dict(bias_correction=False)),
    dict(ours=dict(top_entropy_quantile=0.4), trl=dict(top_q=0.4)),
    dict(ours=dict(entropy_coef=0.05), trl=dict(entropy_coef=0.05)),
    dict(ours=dict(top_entropy_quantile=0.3, entropy_coef=0.2), trl=dict(top_q=0.3, entropy_coef=0.2)),
    dict(ours=dict(off_policy_mask_threshold=0.05), trl=dict(off_policy=0.05)),
    dict(ours=dict(sampling_correction="token_truncate", sampling_correction_clip_max=1.1),
         trl=dict(is_mode="token_truncate", is_max=1.1)),
    dict(ours=dict(sampling_correction="token_mask", sampling_correction_clip_min=0.9, sampling_correction_clip_max=1.1),
         trl=dict(is_mode="token_mask", is_min=0.9, is_max=1.1)),
    dict(ours=dict(sampling_correction="sequence_mask", sampling_correction_clip_max=1.5),
         trl=dict(is_mode="sequence_mask", is_max=1.5)),
    dict(ours=dict(sampling_correction="sequence_truncate", sampling_correction_clip_max=1.2),
         trl=dict(is_mode="sequence_truncate", is_max=1.2)),
])
def test_options_match_trl(loss_type, options):
    if loss_type == "vespo" and options["ours"].get("sampling_correction", "none").startswith("sequence"):
        pytest.skip("vespo takes token-level corrections only (as TRL)")
    base = dict(loss_type=loss_type, beta=0.04)
    hidden, weight, targets, mask, adv, old, ref, sampling = trl_case(2)
    uses_sampler = "sampling_correction" in options["ours"] or "off_policy_mask_threshold" in options["ours"]
    ours, _ = reference_grpo_loss(hidden, weight, targets, mask, adv, old, ref, temperature=0.8,
                                  sampling_logprobs=sampling if uses_sampler else None, **base, **options["ours"])
    (g_ours,) = torch.autograd.grad(ours, hidden)
    theirs = trl_style_loss(hidden @ weight.T / 0.8, targets, mask, adv, old, ref, loss_type, 0.04, 0.2, 0.2, None,
                            "token", 5, sampling=sampling if uses_sampler else None, **options["trl"])
    (g_theirs,) = torch.autograd.grad(theirs, hidden)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-6)


def test_reference_entropy_and_kl_metrics_by_hand():
    # V = 2 with logits (0, ln 3): p = (1/4, 3/4), entropy = -(1/4 ln 1/4 + 3/4 ln 3/4).
    hidden = torch.tensor([[[1.0]]])
    weight = torch.tensor([[0.0], [math.log(3.0)]])
    _, m = reference_grpo_loss(hidden, weight, torch.tensor([[1]]), torch.ones(1, 1), torch.zeros(1),
                               ref_logprobs=torch.tensor([[math.log(0.75) + 1.0]]), loss_type="grpo")
    assert m["entropy"].item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    assert m["kl"].item() == pytest.approx(E - 2, rel=1e-5)


@pytest.mark.parametrize("scale, softcap", [(0.5, None), (1.0, 2.0), (3.0, 1.5)])
def test_reference_logit_transform_by_hand(scale, softcap):
    # Raw logits (0, ln 3) at T = 0.8: z = s y / T, or c tanh(s y / c) / T.
    hidden = torch.tensor([[[1.0]]])
    weight = torch.tensor([[0.0], [math.log(3.0)]])
    y1 = scale * math.log(3.0)
    z1 = (y1 if softcap is None else softcap * math.tanh(y1 / softcap)) / 0.8
    want = z1 - math.log(1 + math.exp(z1))  # log p of token 1
    _, m = reference_grpo_loss(hidden, weight, torch.tensor([[1]]), torch.ones(1, 1), torch.zeros(1),
                               ref_logprobs=torch.tensor([[want]]), loss_type="grpo", temperature=0.8,
                               logit_scale=scale, final_logit_softcapping=softcap)
    assert m["kl"].item() == pytest.approx(0.0, abs=1e-6)  # ref = our log-prob exactly


# ---------------------------------------------------------------- argument errors and warnings


def _args(B=2, T=3, H=4, V=5):
    return dict(hidden=torch.randn(B, T, H), weight=torch.randn(V, H), targets=torch.zeros(B, T, dtype=torch.long),
                mask=torch.ones(B, T), advantages=torch.zeros(B))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(hidden=torch.randn(6, 4)), "hidden"),
        (dict(weight=torch.randn(5, 3)), "weight"),
        (dict(weight=torch.randn(5, 4, dtype=torch.float64)), "weight dtype"),
        (dict(targets=torch.zeros(2, 4, dtype=torch.long)), "targets"),
        (dict(targets=torch.zeros(2, 3)), "targets"),
        (dict(targets=torch.full((2, 3), 5)), "targets"),
        (dict(mask=torch.ones(3, 3)), "mask"),
        (dict(advantages=torch.zeros(2, 3)), "advantages"),
        (dict(old_logprobs=torch.zeros(2, 2)), "old_logprobs"),
        (dict(sampling_logprobs=torch.zeros(3, 3)), "sampling_logprobs"),
        (dict(bias=torch.zeros(4)), "bias"),
        (dict(loss_type="ppo"), "loss_type"),
        (dict(importance_sampling_level="token_mean"), "importance_sampling_level"),
        (dict(beta=0.1), "ref_logprobs"),
        (dict(temperature=0.0), "temperature"),
        (dict(logit_scale=0.0), "logit_scale"),
        (dict(final_logit_softcapping=-1.0), "final_logit_softcapping"),
        (dict(top_entropy_quantile=1.5), "top_entropy_quantile"),
        (dict(entropy_coef=float("nan")), "entropy_coef"),
        (dict(vespo_lambda_pos=-1.0), "vespo_lambda_pos"),
        (dict(sapo_temperature_pos=0.0), "sapo_temperature_pos"),
        (dict(sampling_correction="token"), "sampling_correction"),
        (dict(sampling_correction="token_mask"), "sampling_logprobs"),
        (dict(sampling_correction="token_truncate", sampling_logprobs=torch.zeros(2, 3),
              sampling_correction_clip_max=None), "clip"),
        (dict(sampling_correction="token_mask", sampling_logprobs=torch.zeros(2, 3), sampling_correction_clip_min=3.0),
         "clip_min"),
        (dict(loss_type="vespo", sampling_correction="sequence_mask", sampling_logprobs=torch.zeros(2, 3)), "vespo"),
    ],
)
def test_errors_name_the_argument(change, match):
    args = _args()
    args.setdefault("loss_type", "grpo")
    args.update(change)
    for fn in (reference_grpo_loss, fused_grpo_loss):
        with pytest.raises(ValueError, match=match):
            fn(**args)


@pytest.mark.parametrize("kw, match", [
    (dict(loss_type="luspo"), "luspo"),
    (dict(loss_type="vespo", importance_sampling_level="sequence"), "vespo"),
    (dict(loss_type="dapo", importance_sampling_level="sequence"), "weighs each sequence by its length"),
    (dict(loss_type="cispo"), "TRL recommends epsilon_high around 5"),
])
def test_trl_warnings(kw, match):
    with pytest.warns(UserWarning, match=match):
        reference_grpo_loss(**_args(), **kw)


def test_masked_targets_may_be_padding():
    args = _args()
    args["targets"][:, -1] = -100
    args["mask"][:, -1] = 0
    loss, _ = reference_grpo_loss(**args, loss_type="grpo")
    assert torch.isfinite(loss)


def test_step_threshold_keeps_the_quantile_set_with_a_margin_for_the_loss_pass():
    """The trainer's threshold keeps exactly TRL's set (entropy >= the quantile) and sits midway in
    the gap below it, so the median token recomputed a rounding lower in the loss pass stays kept."""
    from grpo_fast.loss.objective import step_entropy_threshold

    values = torch.tensor([1.0, 3.0, 9.0, 2.0, 7.0])  # median 3.0 is a token's own entropy
    thr = step_entropy_threshold(values, 0.5)
    assert thr.item() == pytest.approx(2.5)  # between 2.0 (dropped) and 3.0 (kept)
    assert ((values >= thr) == (values >= torch.quantile(values, 0.5))).all()
    assert step_entropy_threshold(torch.tensor([4.0, 4.0]), 0.5).item() == 4.0  # all kept: the quantile itself
