"""A step's gradient must not depend on how its batch is split into micro-batches.

Each micro-batch call gets the step-global normalizers: num_items_in_batch (tokens of the step),
num_sequences_in_batch (sequences of the step), max_completion_length, and with the high-entropy
mask / the entropy bonus the step's entropy threshold and its count of kept tokens. The
micro-batch gradients, summed, must equal the gradient of one call on the whole step (fix of
trl#5619; TRL 1.16 still takes the entropy quantile per micro-batch).
"""
import pytest
import torch

from grpo_fast.loss import LOSS_TYPE_NAMES, reference_grpo_loss
from grpo_fast.loss.objective import entropy_threshold
from grpo_fast.ops import fused_grpo_loss, selective_logprobs

pytestmark = pytest.mark.filterwarnings("ignore:.*(luspo|vespo|weighs each sequence|epsilon_high)")
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
    sampling = old + 0.1 * torch.randn(B, T, generator=g)
    return hidden, weight, targets, mask, torch.randn(B, generator=g), old, ref, sampling


def grad_of(impl, hidden, weight, parts, **kw):
    """Sum over micro-batches (row slices) of the gradient to hidden and weight."""
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    total = 0.0
    for rows in parts:
        sl = slice(rows[0], rows[1])
        loss, _ = impl(hidden=h[sl], weight=w, targets=kw["targets"][sl], mask=kw["mask"][sl],
                       advantages=kw["advantages"][sl], old_logprobs=kw["old"][sl], ref_logprobs=kw["ref"][sl],
                       sampling_logprobs=kw["sampling"][sl], **kw["cfg"])
        loss.backward()
        total = total + loss.detach()
    return total, h.grad, w.grad


def bounds(split):
    starts = [sum(split[:i]) for i in range(len(split))]
    return [(s, s + n) for s, n in zip(starts, split)]


def step_config(loss_type, level, mask, **options):
    B, T = mask.shape
    return dict(loss_type=loss_type, importance_sampling_level=level, beta=0.05,
                epsilon_high=3.0 if loss_type == "cispo" else 0.28,
                num_items_in_batch=mask.sum(), num_sequences_in_batch=B, max_completion_length=T, **options)


@pytest.mark.filterwarnings("ignore:.*(luspo|vespo|weighs each sequence)")
@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPE_NAMES)
def test_micro_batches_add_up_to_the_whole_step(loss_type, level, impl):
    hidden, weight, targets, mask, adv, old, ref, sampling = step_inputs()
    data = dict(targets=targets, mask=mask, advantages=adv, old=old, ref=ref, sampling=sampling,
                cfg=step_config(loss_type, level, mask))
    whole = grad_of(IMPLS[impl], hidden, weight, [(0, len(mask))], **data)
    split = grad_of(IMPLS[impl], hidden, weight, bounds(SPLIT), **data)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _step_entropy(hidden, weight, targets, mask, quantile):
    """The step's entropy threshold and kept-token count, as the trainer computes them."""
    _, ent = selective_logprobs(hidden, weight, targets, return_entropy=True, mask=mask)
    thr = entropy_threshold(ent, mask, quantile)
    return dict(entropy_threshold=thr, num_entropy_items_in_batch=((ent >= thr) & (mask != 0)).sum().float())


OPTIONS = {
    "top_entropy_quantile": dict(top_entropy_quantile=0.3),
    "entropy_bonus": dict(entropy_coef=0.2),
    "entropy_bonus_top_entropy": dict(entropy_coef=0.2, top_entropy_quantile=0.5),
    "no_bias_correction": dict(use_bias_correction_kl=False),
    "off_policy_mask": dict(off_policy_mask_threshold=0.01),
    "token_mask": dict(sampling_correction="token_mask", sampling_correction_clip_min=0.9,
                       sampling_correction_clip_max=1.1),
    "sequence_truncate": dict(sampling_correction="sequence_truncate", sampling_correction_clip_max=1.2),
    "softcap_scale": dict(final_logit_softcapping=2.0, logit_scale=1.3),
}


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "luspo", "vespo"])
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_every_option_adds_up(option, loss_type, impl):
    hidden, weight, targets, mask, adv, old, ref, sampling = step_inputs(seed=1)
    options = dict(OPTIONS[option])
    if loss_type == "vespo" and options.get("sampling_correction", "").startswith("sequence"):
        pytest.skip("vespo takes token-level corrections only")
    if "top_entropy_quantile" in options or "entropy_coef" in options:
        options["num_entropy_items_in_batch"] = mask.sum()
        if "top_entropy_quantile" in options:
            with torch.no_grad():
                options.update(_step_entropy(hidden, weight, targets, mask, options["top_entropy_quantile"]))
    data = dict(targets=targets, mask=mask, advantages=adv, old=old, ref=ref, sampling=sampling,
                cfg=step_config(loss_type, "token", mask, **options))
    whole = grad_of(IMPLS[impl], hidden, weight, [(0, len(mask))], **data)
    split = grad_of(IMPLS[impl], hidden, weight, bounds(SPLIT), **data)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_local_normalizers_would_not_add_up():
    """The check above is sensitive: normalizing each micro-batch by its own tokens (TRL's dapo when
    num_items_in_batch is per micro-batch) changes the gradient."""
    hidden, weight, targets, mask, adv, old, ref, sampling = step_inputs()
    data = dict(targets=targets, mask=mask, advantages=adv, old=old, ref=ref, sampling=sampling,
                cfg=dict(loss_type="dapo"))
    whole = grad_of(reference_grpo_loss, hidden, weight, [(0, 6)], **data)
    local = grad_of(reference_grpo_loss, hidden, weight, bounds(SPLIT), **data)
    assert not torch.allclose(whole[1], local[1], rtol=1e-3, atol=1e-5)


def test_per_micro_batch_entropy_quantile_would_not_add_up():
    """TRL's high-entropy threshold is the quantile of each micro-batch's tokens: the gradient then
    depends on the split. Ours takes the step's threshold."""
    hidden, weight, targets, mask, adv, old, ref, sampling = step_inputs(seed=2)
    cfg = step_config("dapo", "token", mask, top_entropy_quantile=0.3)
    data = dict(targets=targets, mask=mask, advantages=adv, old=old, ref=ref, sampling=sampling, cfg=cfg)
    whole = grad_of(reference_grpo_loss, hidden, weight, [(0, 6)], **data)
    local = grad_of(reference_grpo_loss, hidden, weight, bounds(SPLIT), **data)  # no step threshold given
    assert not torch.allclose(whole[1], local[1], rtol=1e-3, atol=1e-5)
