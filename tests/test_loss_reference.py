"""The loss table with values worked out by hand, and the reference loss against TRL's formulas."""
import math

import pytest
import torch

from grpo_fast.loss import reference_grpo_loss
from grpo_fast.loss_types import LOSS_TYPES, LossConfig, PolicyInputs, grpo_objective

E = math.e


def one_token(log_ratio, adv, loss_type, ref_delta=None, **cfg):
    """A single token with logp = 0 and old = -log_ratio; returns (loss, dloss/dlogp, metrics)."""
    logp = torch.zeros(1, 1, requires_grad=True)
    ref = None if ref_delta is None else torch.tensor([[ref_delta]])
    inp = PolicyInputs(logp, torch.ones(1, 1), torch.tensor([float(adv)]),
                       torch.tensor([[-float(log_ratio)]]), ref, None)
    loss, metrics = grpo_objective(inp, LossConfig(loss_type=loss_type, **cfg))
    loss.backward()
    return loss.item(), logp.grad.item(), metrics


def test_ratio_e_is_clipped_to_1_2_for_positive_advantage():
    loss, grad, m = one_token(1.0, adv=1.0, loss_type="grpo")
    assert loss == pytest.approx(-1.2)
    assert grad == 0.0  # clipped: no gradient
    assert (m["clip_ratio/high"].item(), m["clip_ratio/low"].item()) == (1.0, 0.0)
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
    assert m["clip_ratio/high"].item() == 1.0


def test_sapo_soft_gate():
    # On-policy ratio 1: σ(0) = 1/2 → loss = -(4/τ)(1/2)A; d/dlogp = -(4/τ) σ'(0) τ A = -A.
    loss, grad, _ = one_token(0.0, adv=1.0, loss_type="sapo")
    assert (loss, grad) == (pytest.approx(-2.0), pytest.approx(-1.0))
    loss, grad, _ = one_token(0.0, adv=-1.0, loss_type="sapo")  # τ_neg = 1.05
    assert (loss, grad) == (pytest.approx(2.0 / 1.05), pytest.approx(1.0))


def test_k3_kl_term():
    # ref - logp = 1: kl = e - 1 - 1, d kl / d logp = 1 - e; on-policy A = 0 leaves only β kl.
    loss, grad, m = one_token(0.0, adv=0.0, loss_type="dapo", ref_delta=1.0, beta=0.5)
    assert loss == pytest.approx(0.5 * (E - 2))
    assert grad == pytest.approx(0.5 * (1 - E))
    assert m["kl"].item() == pytest.approx(E - 2)


def two_sequences(loss_type, level="token", **cfg):
    """Sequence 0: ratios (1, 2), sequence 1: ratio 4 then a masked token; A = -1 for both, so
    each token's clipped loss is max(ratio, 1.2 clip) = its ratio: 1, 2, 4."""
    logp = torch.zeros(2, 2, requires_grad=True)
    old = -torch.log(torch.tensor([[1.0, 2.0], [4.0, 1.0]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    inp = PolicyInputs(logp, mask, torch.tensor([-1.0, -1.0]), old, None, None)
    cfg = LossConfig(loss_type=loss_type, importance_sampling_level=level, **cfg)
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


def test_on_policy_ratio_is_one_with_gradient():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    inp = PolicyInputs(logp, torch.ones(1, 2), torch.tensor([2.0]), None, None, None)
    loss, m = grpo_objective(inp, LossConfig(loss_type="dapo"))
    loss.backward()
    assert loss.item() == pytest.approx(-2.0)  # -ratio · A with ratio 1
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, -1.0]]))  # -A / 2 tokens
    assert m["ratio"].item() == 1.0


def test_huge_log_ratio_stays_finite():
    loss, grad, m = one_token(500.0, adv=-1.0, loss_type="dapo")
    assert math.isfinite(loss) and loss == pytest.approx(math.exp(20.0), rel=1e-5)
    assert grad == 0.0  # past the clamp


# ---------------------------------------------------------------- against TRL's formulas


def trl_style_loss(logits, targets, mask, adv, old, ref, loss_type, beta, eps_low, eps_high, delta,
                   level, max_len, sapo=(1.0, 1.05)):
    """An independent transcription of TRL 1.x GRPOTrainer._compute_loss (one process, one step)."""
    logps = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    adv = adv.unsqueeze(1)
    old = logps.detach() if old is None else old
    log_ratio = logps - old
    if level == "token":
        liw = log_ratio
    else:
        liw = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(liw)
    if beta != 0.0:
        kl = torch.exp(ref - logps) - (ref - logps) - 1
    if loss_type == "cispo":
        ptl = -torch.clamp(coef_1, max=eps_high).detach() * adv * logps
    elif loss_type == "sapo":
        temps = torch.where(adv > 0, sapo[0], sapo[1])
        ptl = -torch.sigmoid(temps * (coef_1 - 1)) * 4 / temps * adv
    else:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        ptl = -torch.min(coef_1 * adv, coef_2 * adv)
    if beta != 0.0:
        ptl = ptl + beta * kl
    if loss_type in ("grpo", "sapo"):
        return ((ptl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (ptl * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (ptl * mask).sum() / (ptl.size(0) * max_len)
    return (ptl * mask).sum() / mask.sum().clamp(min=1.0)  # dapo, cispo: num_items_in_batch


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_reference_matches_trl(loss_type, level):
    g = torch.Generator().manual_seed(1)
    B, T, H, V = 3, 5, 8, 23
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g) * 0.5
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[0, 0] = 1.0
    adv = torch.randn(B, generator=g)
    with torch.no_grad():
        logits = hidden @ weight.T / 0.8
        lp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    old = lp + 0.3 * torch.randn(B, T, generator=g)
    ref = lp + 0.3 * torch.randn(B, T, generator=g)
    eps_high = 3.0 if loss_type == "cispo" else 0.28
    kw = dict(beta=0.04, delta=1.5 if loss_type == "grpo" else None)

    ours, _ = reference_grpo_loss(hidden, weight, targets, mask, adv, old, ref, loss_type=loss_type,
                                  epsilon_high=eps_high, temperature=0.8, importance_sampling_level=level,
                                  max_completion_length=7, **kw)
    (g_ours,) = torch.autograd.grad(ours, hidden)
    theirs = trl_style_loss(hidden @ weight.T / 0.8, targets, mask, adv, old, ref, loss_type, kw["beta"],
                            0.2, eps_high, kw["delta"], level, 7)
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


# ---------------------------------------------------------------- argument errors


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
        (dict(bias=torch.zeros(4)), "bias"),
        (dict(loss_type="ppo"), "loss_type"),
        (dict(importance_sampling_level="token_mean"), "importance_sampling_level"),
        (dict(beta=0.1), "ref_logprobs"),
        (dict(temperature=0.0), "temperature"),
    ],
)
def test_errors_name_the_argument(change, match):
    args = _args()
    args.setdefault("loss_type", "grpo")
    args.update(change)
    with pytest.raises(ValueError, match=match):
        reference_grpo_loss(**args)


def test_masked_targets_may_be_padding():
    args = _args()
    args["targets"][:, -1] = -100
    args["mask"][:, -1] = 0
    loss, _ = reference_grpo_loss(**args, loss_type="grpo")
    assert torch.isfinite(loss)
