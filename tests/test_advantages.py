"""compute_advantages: group baseline, std scaling, abstentions, the zero-spread rule and GDPO;
informative_groups (what dynamic sampling keeps) and reward_totals (the logged reward)."""
import math

import pytest
import torch

from grpo_fast.loss import compute_advantages, informative_groups, reward_totals


def test_group_scaling_hand_values():
    # Group 1: [1, 3] → mean 2, Bessel std sqrt(2) → ±1/(sqrt(2)+1e-4).
    adv = compute_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), num_generations=2)
    s = 1.0 / (math.sqrt(2.0) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([-s, s, 0.0, 0.0]))


def test_zero_spread_group_is_exactly_zero_in_every_mode():
    # 0.1 * 3 / 3 != 0.1 in floating point: the naive (r - mean) / (0 + 1e-4) would give ~1e-4, not 0.
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.0, 1.0, 2.0])
    for mode in ("group", "batch", "none"):
        adv = compute_advantages(rewards, num_generations=3, scale_rewards=mode)
        assert torch.equal(adv[:3], torch.zeros(3)), mode
        assert torch.isfinite(adv).all()
        assert adv[3] < 0 < adv[5]


def test_batch_and_none_scaling():
    rewards = torch.tensor([0.0, 2.0, 4.0, 10.0])
    none = compute_advantages(rewards, num_generations=2, scale_rewards="none")
    torch.testing.assert_close(none, torch.tensor([-1.0, 1.0, -3.0, 3.0]))
    batch = compute_advantages(rewards, num_generations=2, scale_rewards="batch")
    std = rewards.std()  # Bessel, over the whole batch
    torch.testing.assert_close(batch, none / (std + 1e-4))


def test_weights_and_abstention_follow_nansum():
    # Two functions, weights (1, 2). Sample 1 abstains on f2 (NaN), sample 3 on f1 (None).
    rewards = [[1.0, 1.0], [2.0, float("nan")], [0.0, 1.0], [None, 3.0]]
    adv = compute_advantages(rewards, num_generations=2, scale_rewards="none", reward_weights=[1.0, 2.0])
    # Totals (3, 2 | 2, 6): group means 2.5 and 4.
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -2.0, 2.0]))


def test_unscorable_row_gets_zero_and_is_left_out_of_the_baseline():
    rewards = torch.tensor([[1.0], [float("nan")], [3.0], [0.0], [0.0], [0.0]])
    adv = compute_advantages(rewards, num_generations=3, scale_rewards="none")
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


def test_single_generation_and_single_scorable_value_give_zero():
    assert torch.equal(compute_advantages(torch.tensor([1.0, 5.0]), num_generations=1), torch.zeros(2))
    adv = compute_advantages(torch.tensor([float("nan"), 2.0]), num_generations=2, scale_rewards="batch")
    assert torch.equal(adv, torch.zeros(2))


def test_matches_trl_formula_on_random_rewards():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(24, 3, generator=g)
    w = torch.tensor([1.0, 0.5, -2.0])
    r = (rewards * w).sum(1).view(-1, 4)
    expected = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()
    torch.testing.assert_close(compute_advantages(rewards, 4, "group", w), expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rewards=torch.ones(5), num_generations=2), "multiple of num_generations"),
        (dict(rewards=torch.ones(4), num_generations=0), "num_generations"),
        (dict(rewards=torch.ones(4), num_generations=2.0), "num_generations"),
        (dict(rewards=torch.ones(4, 2, 1), num_generations=2), "rewards"),
        (dict(rewards=torch.ones(0), num_generations=2), "rewards"),
        (dict(rewards=torch.ones(4), num_generations=2, scale_rewards="std"), "scale_rewards"),
        (dict(rewards=torch.ones(4, 2), num_generations=2, reward_weights=[1.0]), "reward_weights"),
        (dict(rewards=torch.ones(4, 2), num_generations=2, multi_objective_aggregation="sum"),
         "multi_objective_aggregation"),
    ],
)
def test_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute_advantages(**kwargs)


def test_gdpo_normalize_then_sum_by_hand():
    """Two functions, weights (1, 3). Group 1 varies only in f1 (1, 0), group 2 only in f2 (1, 3).
    Each function is z-scored in its group first (a zero-spread function gives exactly 0), the
    weighted sums are z-scored over the batch: r = (a, -a, -3b, 3b), a = 0.5 / (std(1, 0) + 1e-4),
    b = 1 / (std(1, 3) + 1e-4). Summing first would scale both groups to the same ±0.707."""
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 3.0]])
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    b = 1.0 / (math.sqrt(2.0) + 1e-4)
    r = torch.tensor([a, -a, -3 * b, 3 * b])
    want = r / (r.std() + 1e-4)  # batch mean is 0
    got = compute_advantages(rewards, 2, reward_weights=[1.0, 3.0], multi_objective_aggregation="normalize_then_sum")
    torch.testing.assert_close(got, want)
    assert got[3] / got[0] == pytest.approx(3 * b / a, rel=1e-5)
    summed = compute_advantages(rewards, 2, reward_weights=[1.0, 3.0])
    assert summed[0] == pytest.approx(-summed[2].item(), rel=1e-3)  # both ±0.707 (up to the 1e-4 eps) summed first


def test_gdpo_zero_spread_groups_and_abstentions_are_zero():
    rewards = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, float("nan")], [1.0, 5.0], [float("nan")] * 2, [2.0, 0.0]])
    adv = compute_advantages(rewards, 2, multi_objective_aggregation="normalize_then_sum")
    assert torch.equal(adv[:2], torch.zeros(2))  # every function constant in the group
    assert adv[4] == 0.0  # unscorable
    assert adv[3] > 0 > adv[2] and torch.isfinite(adv).all()


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_informative_groups(aggregation):
    # [1, 1, abstain, 1]: all advantages 0, so not informative, though totals with abstention as 0 differ.
    nan = float("nan")
    rewards = torch.tensor([[1.0], [1.0], [nan], [1.0], [1.0], [nan], [0.0], [1.0]])
    flags = informative_groups(rewards, 4, multi_objective_aggregation=aggregation)
    assert flags.tolist() == [False, True]
    assert torch.equal(compute_advantages(rewards, 4, multi_objective_aggregation=aggregation)[:4], torch.zeros(4))
    # A function with weight 0 carries no signal.
    two = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert informative_groups(two, 2, [1.0, 0.0], aggregation).tolist() == [False]


def test_reward_totals_leave_unscorable_rows_out():
    totals = reward_totals([[1.0, None], [None, None], [2.0, 3.0]], [1.0, 2.0])
    assert totals[0] == 1.0 and math.isnan(totals[1]) and totals[2] == 8.0
