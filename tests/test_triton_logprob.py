"""Triton log-prob kernels (grpo_fast.kernels.logprob) against a plain PyTorch reference.

On this CPU machine the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), so shapes are
small; the tile configs are chosen to exercise masking (N, V, H not multiples of the blocks),
several V splits, and several K chunks. The reference materializes the logits in float64, which
is "exact" next to both fp32 and bf16 results.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from grpo_fast.kernels import logprob as K
from grpo_fast.kernels._config import KINDS, SMEM_LIMIT_BYTES, TileConfig, configs_for, \
    num_v_splits, select_config

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1")

V_ODD, N_ODD, H_ODD = 1031, 37, 40  # H = 40: not a multiple of BLOCK_K = 32 (or 16)
SMALL_TILES = TileConfig(16, 128, 32, 4, 1)  # 16-row blocks; V_ODD: 9 V tiles; H_ODD: 2 K chunks


def make_inputs(n, v, h, bias=True, seed=0, scale=1.0):
    """fp32 'true' inputs: hidden ~ N(0, 1), weight ~ N(0, 1/h) so logits are O(scale)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (scale / math.sqrt(h))
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    grad_logp = torch.randn(n, generator=g)
    return hidden, weight, b, targets, grad_logp


def reference(hidden, weight, bias, targets, temperature, grad_logp, dtype=torch.float64):
    """Materialized logits in `dtype` (float64: the truth). Returns a dict of outputs and grads."""
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    b = bias.detach().to(dtype).requires_grad_() if bias is not None else None
    z = F.linear(h, w, b) / temperature  # [N, V]
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, targets[:, None])[:, 0] - lse
    entropy = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    (logp * grad_logp.to(dtype)).sum().backward()
    return dict(logp=logp.detach(), lse=lse.detach(), entropy=entropy.detach(), grad_hidden=h.grad,
                grad_weight=w.grad, grad_bias=None if b is None else b.grad)


def torch_lowp(hidden, weight, bias, targets, temperature, grad_logp, dtype):
    """What a bf16/fp16 model does with torch: logits from a low-precision linear, upcast, softmax."""
    h = hidden.to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_()
    b = bias.to(dtype).requires_grad_() if bias is not None else None
    z = F.linear(h, w, b).float() / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, targets[:, None])[:, 0] - lse
    entropy = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    (logp * grad_logp).sum().backward()
    return dict(logp=logp.detach(), lse=lse.detach(), entropy=entropy.detach(), grad_hidden=h.grad,
                grad_weight=w.grad, grad_bias=None if b is None else b.grad)


def run_kernels(hidden, weight, bias, targets, temperature, grad_logp, need_w=True, need_b=None,
                config=None, v_splits=None, entropy=True):
    need_b = bias is not None if need_b is None else need_b
    logp, lse, ent = K.logprob_forward(hidden, weight, bias, targets, temperature, entropy,
                                       config=config, v_splits=v_splits)
    gh, gw, gb = K.logprob_backward(hidden, weight, bias, targets, lse, grad_logp, temperature,
                                    need_w, need_b, config_dh=config, config_dw=config,
                                    v_splits=v_splits)
    return dict(logp=logp, lse=lse, entropy=ent, grad_hidden=gh, grad_weight=gw, grad_bias=gb)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


# fp32: each value is a sum of H (or V, or N) fp32 products in a different order from the
# reference: error ~ few ulp * sqrt(terms) * magnitude, far below these bounds for O(1) logits.
FP32_TOL = dict(logp=2e-5, lse=2e-5, entropy=2e-5, grad_hidden=2e-5, grad_weight=2e-5,
                grad_bias=2e-5)


@pytest.mark.parametrize("n,v,h,temperature,bias,need_w,v_splits,config", [
    (N_ODD, V_ODD, H_ODD, 0.7, True, True, None, None),     # default splits (4) and tiles
    (N_ODD, V_ODD, H_ODD, 1.0, False, True, 1, SMALL_TILES),  # one split, 16-row blocks
    (1, V_ODD, H_ODD, 1.3, True, False, 3, SMALL_TILES),    # N = 1, frozen head, 3 splits
    (N_ODD, 17, 24, 1.0, True, True, None, SMALL_TILES),    # V smaller than one V tile
])
def test_fp32_matches_reference(n, v, h, temperature, bias, need_w, v_splits, config):
    hidden, weight, b, targets, g = make_inputs(n, v, h, bias)
    out = run_kernels(hidden, weight, b, targets, temperature, g, need_w=need_w,
                      config=config, v_splits=v_splits)
    ref = reference(hidden, weight, b, targets, temperature, g)
    for name, tol in FP32_TOL.items():
        if name == "grad_weight" and not need_w:
            assert out[name] is None  # frozen head: no [V, H] buffer, no dW work
            continue
        if name == "grad_bias" and b is None:
            assert out[name] is None
            continue
        assert out[name].dtype == torch.float32 and out[name].shape == ref[name].shape, name
        assert max_err(out[name], ref[name]) < tol, (name, max_err(out[name], ref[name]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_as_close_as_torch(dtype):
    """bf16/fp16 inputs: the kernels' error against the fp32-input truth must not exceed torch's
    own low-precision computation (logits from a bf16 linear) by more than 10% + a floor of one
    fp32-level rounding. Both see the same input rounding; torch also rounds the logits (and
    its grads) to bf16, the kernels keep fp32 logits and return fp32 grad_weight / grad_bias,
    so in practice the kernels are closer. grad_hidden is returned in the input dtype, like torch.
    """
    hidden, weight, b, targets, g = make_inputs(N_ODD, V_ODD, H_ODD, True, seed=1, scale=3.0)
    truth = reference(hidden, weight, b, targets, 0.7, g)
    ours = run_kernels(hidden.to(dtype), weight.to(dtype), b.to(dtype), targets, 0.7, g)
    theirs = torch_lowp(hidden, weight, b, targets, 0.7, g, dtype)
    assert ours["grad_hidden"].dtype == dtype
    assert ours["grad_weight"].dtype == torch.float32 and ours["grad_bias"].dtype == torch.float32
    for name in truth:
        e_ours, e_torch = max_err(ours[name], truth[name]), max_err(theirs[name], truth[name])
        assert e_torch > 0, name  # the comparison means something: torch's error is visible
        assert e_ours <= 1.1 * e_torch + 1e-5, (name, e_ours, e_torch)


def test_large_logits_low_temperature():
    """Logits of a few hundred (scale 20, T = 0.1): the online max-shift keeps exp in range and
    the max-relative entropy sum avoids cancelling lse against E[z] (both ~200)."""
    hidden, weight, b, targets, g = make_inputs(N_ODD, V_ODD, H_ODD, True, seed=2, scale=20.0)
    out = run_kernels(hidden, weight, b, targets, 0.1, g, config=SMALL_TILES, v_splits=5)
    ref = reference(hidden, weight, b, targets, 0.1, g)
    for name in ref:
        scale = ref[name].abs().max().item()
        assert torch.isfinite(out[name]).all(), name
        assert max_err(out[name], ref[name]) < 2e-5 * max(scale, 1.0) * 10, name


def test_zero_grad_rows_are_skipped_and_exact():
    """Rows with grad_logp = 0 (masked tokens, zero-advantage groups) contribute nothing; a whole
    zero row block is skipped and its grad_hidden rows are exactly 0."""
    hidden, weight, b, targets, g = make_inputs(N_ODD, V_ODD, H_ODD, True, seed=3)
    g[:16] = 0.0  # the first 16-row block entirely, plus scattered rows
    g[20] = g[33] = 0.0
    out = run_kernels(hidden, weight, b, targets, 1.0, g, config=SMALL_TILES)
    ref = reference(hidden, weight, b, targets, 1.0, g)
    assert (out["grad_hidden"][:16] == 0).all() and (out["grad_hidden"][[20, 33]] == 0).all()
    for name in ("grad_hidden", "grad_weight", "grad_bias"):
        assert max_err(out[name], ref[name]) < 2e-5, name
    gh, gw, gb = K.logprob_backward(hidden, weight, b, targets, out["lse"], torch.zeros(N_ODD),
                                    1.0, True, True)
    assert not gh.any() and not gw.any() and not gb.any()


def test_bias_grad_without_weight_grad():
    hidden, weight, b, targets, g = make_inputs(N_ODD, V_ODD, H_ODD, True, seed=4)
    out = run_kernels(hidden, weight, b, targets, 1.0, g, need_w=False, need_b=True)
    ref = reference(hidden, weight, b, targets, 1.0, g)
    assert out["grad_weight"] is None
    assert max_err(out["grad_bias"], ref["grad_bias"]) < 2e-5
    assert max_err(out["grad_hidden"], ref["grad_hidden"]) < 2e-5


def test_forward_options_and_edge_cases():
    hidden, weight, b, targets, _ = make_inputs(5, 70, 16, True, seed=5)
    logp, lse, ent = K.logprob_forward(hidden, weight, b, targets, 1.0, False)
    assert ent is None and logp.shape == lse.shape == (5,)
    bad = targets.clone()
    bad[1], bad[3] = -1, 70  # outside [0, V): NaN, not a silently wrong number
    logp_bad, _, _ = K.logprob_forward(hidden, weight, b, bad, 1.0, False)
    assert logp_bad[[1, 3]].isnan().all() and torch.equal(logp_bad[[0, 2, 4]], logp[[0, 2, 4]])
    empty = K.logprob_forward(hidden[:0], weight, b, targets[:0], 1.0, True)
    assert all(t.shape == (0,) for t in empty)
    gh, gw, gb = K.logprob_backward(hidden[:0], weight, b, targets[:0], empty[1], empty[0], 1.0,
                                    True, True)
    assert gh.shape == (0, 16) and not gw.any() and not gb.any()


def test_validation_names_the_argument(monkeypatch):
    hidden, weight, b, targets, g = make_inputs(4, 64, 16, True)
    lse = torch.zeros(4)
    good = dict(hidden=hidden, weight=weight, bias=b, targets=targets, temperature=1.0,
                compute_entropy=True)

    def fwd(**kw):
        return K.logprob_forward(**{**good, **kw})

    cases = [
        (dict(hidden=hidden.t().contiguous().t()), "hidden"),  # non-contiguous
        (dict(hidden=hidden.double()), "hidden"),
        (dict(weight=weight.bfloat16()), "weight"),  # dtype differs from hidden
        (dict(weight=weight[:, :8].contiguous()), "weight"),
        (dict(bias=b[:10]), "bias"),
        (dict(targets=targets.int()), "targets"),
        (dict(targets=targets[:3]), "targets"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
    ]
    for kw, name in cases:
        with pytest.raises(ValueError, match=name):
            fwd(**kw)
    with pytest.raises(ValueError, match="lse"):
        K.logprob_backward(hidden, weight, b, targets, lse.double(), g, 1.0, True, True)
    with pytest.raises(ValueError, match="grad_logp"):
        K.logprob_backward(hidden, weight, b, targets, lse, g[:2], 1.0, True, True)
    with pytest.raises(ValueError, match="need_grad_bias"):
        K.logprob_backward(hidden, weight, None, targets, lse, g, 1.0, True, True)
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="hidden"):
            fwd()


def test_config_selection_stays_in_the_enumerated_tables():
    """Whatever N, the launcher picks a config the compile test builds; splits are sane."""
    for cap in SMEM_LIMIT_BYTES:
        for kind in KINDS:
            for elem in (2, 4):
                table = configs_for(kind, cap, elem)
                for n in (1, 16, 31, 32, 33, 64, 1000, 100_000):
                    assert select_config(kind, cap, elem, n) in table
    for blocks in (1, 3, 64, 10_000):
        for tiles in (1, 2, 17, 1200):
            s = num_v_splits(blocks, tiles, 132)
            assert 1 <= s <= tiles
    for n_v in (1, 17, 64, 65, 1031, 151_936):
        for want in (1, 2, 3, 7, 64, 5000):
            splits, per = K._split_range(n_v, 64, want)
            assert per % 64 == 0 and (splits - 1) * per < n_v <= splits * per  # none empty


@pytest.mark.parametrize("dtype,v_splits,config", [
    (torch.float32, None, None),
    (torch.float32, 3, SMALL_TILES),
    (torch.bfloat16, 1, SMALL_TILES),
])
def test_forward_input_grad_matches_reference(dtype, v_splits, config):
    """Frozen head: D = d logp / d hidden from the forward sweep; grad_logp * D is grad_hidden."""
    hidden, weight, b, targets, g = make_inputs(N_ODD, V_ODD, H_ODD, True, seed=6, scale=3.0)
    truth = reference(hidden, weight, b, targets, 0.7, g)
    args = (hidden.to(dtype), weight.to(dtype), b.to(dtype), targets, 0.7, True)
    logp, lse, ent, dlogp_dh = K.logprob_forward_input_grad(*args, config=config, v_splits=v_splits)
    assert dlogp_dh.dtype == torch.float32 and dlogp_dh.shape == (N_ODD, H_ODD)
    ours = dict(logp=logp, lse=lse, entropy=ent, grad_hidden=g[:, None] * dlogp_dh)
    plain = K.logprob_forward(*args, config=config, v_splits=v_splits)
    for name, x in zip(("logp", "lse", "entropy"), plain):
        assert max_err(ours[name], x) < 1e-6, name  # same sweep, same statistics
    if dtype == torch.float32:
        for name, x in ours.items():
            assert max_err(x, truth[name]) < 2e-5, name
    else:  # as close as torch's bf16 (see test_low_precision_as_close_as_torch)
        theirs = torch_lowp(hidden, weight, b, targets, 0.7, g, dtype)
        for name, x in ours.items():
            assert max_err(x, truth[name]) <= 1.1 * max_err(theirs[name], truth[name]) + 1e-5, name


def test_forward_input_grad_bad_target_and_empty():
    hidden, weight, b, targets, _ = make_inputs(5, 70, 16, True, seed=7)
    targets[2] = 70
    logp, _, ent, grad = K.logprob_forward_input_grad(hidden, weight, b, targets, 1.0, False)
    assert ent is None and logp[2].isnan() and grad[2].isnan().all()
    assert torch.isfinite(grad[[0, 1, 3, 4]]).all()
    logp, lse, ent, grad = K.logprob_forward_input_grad(hidden[:0], weight, b, targets[:0], 1.0, True)
    assert grad.shape == (0, 16) and ent.shape == (0,)


def reference_with_entropy(hidden, weight, bias, targets, temperature, grad_logp, grad_entropy, scale=1.0,
                           softcap=None, dtype=torch.float64):
    """Materialized float64 truth of Σ g logp + g' entropy under z = transform(h W^T + b)."""
    from grpo_fast.loss.head import LogitTransform

    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    b = bias.detach().to(dtype).requires_grad_() if bias is not None else None
    z = LogitTransform(temperature, scale, softcap).apply(F.linear(h, w, b))
    log_p = torch.log_softmax(z, dim=-1)
    logp = log_p.gather(1, targets[:, None])[:, 0]
    entropy = -(log_p.exp() * log_p).sum(-1)
    (logp * grad_logp.to(dtype) + entropy * grad_entropy.to(dtype)).sum().backward()
    return dict(logp=logp.detach(), lse=torch.logsumexp(z, -1).detach(), entropy=entropy.detach(),
                grad_hidden=h.grad, grad_weight=w.grad, grad_bias=None if b is None else b.grad)


@pytest.mark.parametrize("softcap, scale, need_w", [(None, 1.0, True), (2.5, 1.3, True), (1.5, 0.8, False)])
def test_entropy_gradient_and_logit_transform_fp32(softcap, scale, need_w):
    """The entropy's gradient through the backward kernels (frozen and trainable head) and the
    logits' scale / tanh soft cap in every kernel, against float64 autograd."""
    hidden, weight, b, targets, g = make_inputs(N_ODD, V_ODD, H_ODD, True, seed=12, scale=3.0)
    g_ent = torch.randn(N_ODD, generator=torch.Generator().manual_seed(3))
    g_ent[:16] = 0.0  # a row block with a logp gradient only
    truth = reference_with_entropy(hidden, weight, b, targets, 0.7, g, g_ent, scale, softcap)
    logp, lse, ent = K.logprob_forward(hidden, weight, b, targets, 0.7, True, logit_scale=scale, softcap=softcap,
                                       config=SMALL_TILES, v_splits=3)
    gh, gw, gb = K.logprob_backward(hidden, weight, b, targets, lse, g, 0.7, need_w, True, logit_scale=scale,
                                    softcap=softcap, entropy=ent, grad_entropy=g_ent, config_dh=SMALL_TILES,
                                    config_dw=SMALL_TILES, v_splits=2)
    ours = dict(logp=logp, lse=lse, entropy=ent, grad_hidden=gh, grad_weight=gw, grad_bias=gb)
    for name, want in truth.items():
        if name == "grad_weight" and not need_w:
            assert gw is None
            continue
        scale_ = max(want.abs().max().item(), 1.0)
        assert max_err(ours[name], want) < 3e-5 * scale_, (name, max_err(ours[name], want))


def test_entropy_gradient_bf16_as_close_as_torch():
    hidden, weight, b, targets, g = make_inputs(N_ODD, V_ODD, H_ODD, True, seed=13, scale=3.0)
    g_ent = torch.randn(N_ODD, generator=torch.Generator().manual_seed(4))
    truth = reference_with_entropy(hidden, weight, b, targets, 0.9, g, g_ent)
    dt = torch.bfloat16
    hb, wb, bb = hidden.to(dt), weight.to(dt), b.to(dt)
    logp, lse, ent = K.logprob_forward(hb, wb, bb, targets, 0.9, True)
    gh, gw, gb = K.logprob_backward(hb, wb, bb, targets, lse, g, 0.9, True, True, entropy=ent, grad_entropy=g_ent)
    # torch's bf16 computation: logits from a bf16 linear (rounded), then fp32
    h2, w2, b2 = hb.clone().requires_grad_(), wb.clone().requires_grad_(), bb.clone().requires_grad_()
    lp_all = torch.log_softmax(F.linear(h2, w2, b2).float() / 0.9, -1)
    ((lp_all.gather(1, targets[:, None])[:, 0] * g) + (-(lp_all.exp() * lp_all).sum(-1)) * g_ent).sum().backward()
    torch_grads = dict(grad_hidden=h2.grad, grad_weight=w2.grad, grad_bias=b2.grad)
    ours = dict(grad_hidden=gh, grad_weight=gw, grad_bias=gb)
    for name, x in ours.items():
        assert max_err(x, truth[name]) <= 1.1 * max_err(torch_grads[name], truth[name]) + 1e-5, name
