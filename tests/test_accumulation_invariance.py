"""A step's gradient must not depend on how its batch is split into micro-batches.

Each micro-batch call gets the step-global normalizers: num_items_in_batch (tokens of the step),
num_sequences_in_batch (sequences of the step) and max_completion_length. The micro-batch
gradients, summed, must equal the gradient of one call on the whole step (fix of trl#5619).
"""
import pytest
import torch

from grpo_fast.loss import reference_grpo_loss
from grpo_fast.loss_types import LOSS_TYPES
from grpo_fast.ops import fused_grpo_loss

IMPLS = {"reference": reference_grpo_loss, "fused_cpu": lambda **kw: fused_grpo_loss(backend="cpu", **kw)}
SPLIT = [2, 1, 3]  # uneven on purpose: equal micro-batches hide a wrong normalizer for grpo


def step_inputs(seed=0, B=6, T=7, H=8, V=97):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    targets = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([7, 2, 5, 0, 3, 6])  # one empty completion
    mask = (torch.arange(T) < lengths[:, None]).float()
    with torch.no_grad():
        lp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    old = lp + 0.4 * torch.randn(B, T, generator=g)
    ref = lp + 0.4 * torch.randn(B, T, generator=g)
    return hidden, weight, targets, mask, torch.randn(B, generator=g), old, ref


def grad_of(impl, hidden, weight, parts, **kw):
    """Sum over micro-batches (row slices) of the gradient to hidden and weight."""
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    total = 0.0
    for rows in parts:
        sl = slice(rows[0], rows[1])
        loss, _ = impl(hidden=h[sl], weight=w, targets=kw["targets"][sl], mask=kw["mask"][sl],
                       advantages=kw["advantages"][sl], old_logprobs=kw["old"][sl], ref_logprobs=kw["ref"][sl],
                       **kw["cfg"])
        loss.backward()
        total = total + loss.detach()
    return total, h.grad, w.grad


def bounds(split):
    starts = [sum(split[:i]) for i in range(len(split))]
    return [(s, s + n) for s, n in zip(starts, split)]


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_micro_batches_add_up_to_the_whole_step(loss_type, level, impl):
    hidden, weight, targets, mask, adv, old, ref = step_inputs()
    B, T = mask.shape
    cfg = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.05,
               epsilon_high=3.0 if loss_type == "cispo" else 0.28,
               num_items_in_batch=mask.sum(), num_sequences_in_batch=B, max_completion_length=T)
    data = dict(targets=targets, mask=mask, advantages=adv, old=old, ref=ref, cfg=cfg)
    whole = grad_of(IMPLS[impl], hidden, weight, [(0, B)], **data)
    split = grad_of(IMPLS[impl], hidden, weight, bounds(SPLIT), **data)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_local_normalizers_would_not_add_up():
    """The check above is sensitive: normalizing each micro-batch by its own tokens (TRL's dapo when
    num_items_in_batch is per micro-batch) changes the gradient."""
    hidden, weight, targets, mask, adv, old, ref = step_inputs()
    data = dict(targets=targets, mask=mask, advantages=adv, old=old, ref=ref, cfg=dict(loss_type="dapo"))
    whole = grad_of(reference_grpo_loss, hidden, weight, [(0, 6)], **data)
    local = grad_of(reference_grpo_loss, hidden, weight, bounds(SPLIT), **data)
    assert not torch.allclose(whole[1], local[1], rtol=1e-3, atol=1e-5)
