"""The chunked CPU path against the materialized reference: outputs, metrics and every gradient."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from grpo_fast.loss import LOSS_TYPE_NAMES, logprob_cpu, reference_grpo_loss
from grpo_fast.loss.arguments import loss_params, policy_inputs
from grpo_fast.loss.head import LogitTransform
from grpo_fast.loss.logprob_function import RowGrads, selective_logprob
from grpo_fast.loss.objective import entropy_threshold, grpo_objective
from grpo_fast.ops import fused_grpo_loss, selective_logprobs

LOSS_NAMES = list(LOSS_TYPE_NAMES)
# TRL's warnings for some option combinations (tested in test_loss_reference.py)
pytestmark = pytest.mark.filterwarnings("ignore:.*(luspo|vespo|weighs each sequence|epsilon_high)")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # A few rows per chunk, so every test crosses chunk boundaries (and a ragged last chunk).
    monkeypatch.setattr(logprob_cpu, "CHUNK_BYTES", 4 * 1031 * 3)


def make_case(B=3, T=5, H=16, V=1031, dtype=torch.float32, seed=0, old=True, ref=True, bias=True,
              empty_row=True, train_head=True, sampling=False):
    """Inputs with logits of spread ~2 and old/ref log-probs near the policy's (ratios near 1)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (2.0 / H**0.5)
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.25).float()
    mask[0, 0] = 1.0
    if empty_row and B > 1:
        mask[-1] = 0.0  # a fully masked sequence
        targets[-1] = -100  # padding targets must not matter
    with torch.no_grad():
        z = hidden @ weight.T + (0 if b is None else b)
        lp = torch.log_softmax(z, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    case = dict(
        hidden=hidden.to(dtype).requires_grad_(),
        weight=weight.to(dtype).requires_grad_(train_head),
        bias=None if b is None else b.to(dtype).requires_grad_(train_head),
        targets=targets, mask=mask, advantages=torch.randn(B, generator=g),
        old_logprobs=(lp + 0.3 * torch.randn(B, T, generator=g)) if old else None,
        ref_logprobs=(lp + 0.3 * torch.randn(B, T, generator=g)) if ref else None,
    )
    if sampling:  # the sampler's log-probs: near the old ones (or the policy's when on-policy)
        base = case["old_logprobs"] if old else lp
        case["sampling_logprobs"] = base + 0.1 * torch.randn(B, T, generator=g)
    return case


def run(fn, case, **kw):
    """(loss, metrics, grads of hidden / weight / bias) after one backward."""
    for name in ("hidden", "weight", "bias"):
        if case[name] is not None:
            case[name].grad = None
    loss, metrics = fn(**case, **kw)
    loss.backward()
    grads = {n: None if case[n] is None else case[n].grad for n in ("hidden", "weight", "bias")}
    return loss.detach(), metrics, grads


def assert_same(a, b, rtol=1e-4, atol=1e-5):
    (la, ma, ga), (lb, mb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=rtol, atol=atol)
    assert ma.keys() == mb.keys()
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k], rtol=rtol, atol=atol, msg=lambda m: f"metric {k}: {m}")
    for k in ga:
        assert (ga[k] is None) == (gb[k] is None), k
        if ga[k] is not None:
            torch.testing.assert_close(ga[k], gb[k], rtol=rtol, atol=atol, msg=lambda m: f"grad {k}: {m}")


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_NAMES)
def test_every_loss_type_matches_reference(loss_type, level):
    case = make_case(seed=LOSS_NAMES.index(loss_type))
    kw = dict(loss_type=loss_type, beta=0.05, temperature=0.7, importance_sampling_level=level,
              epsilon_high=2.0 if loss_type == "cispo" else 0.28)
    assert_same(run(reference_grpo_loss, case, **kw), run(fused_grpo_loss, case, backend="cpu", **kw))


@pytest.mark.parametrize("loss_type", LOSS_NAMES)
def test_on_policy_without_ref_frozen_head(loss_type, monkeypatch):
    case = make_case(old=False, ref=False, bias=False, train_head=False, seed=7)
    expected = run(reference_grpo_loss, case, loss_type=loss_type)

    def no_recompute(*a, **k):
        raise AssertionError("a frozen head must use the gradient-ready forward")

    monkeypatch.setattr(logprob_cpu, "logprob_backward", no_recompute)
    got = run(fused_grpo_loss, case, loss_type=loss_type, backend="cpu")
    assert_same(expected, got)
    assert got[2]["weight"] is None  # no dW for a frozen head
    assert got[1]["ratio"].item() == 1.0


def test_frozen_weight_with_trainable_bias_and_temperature():
    case = make_case(train_head=False)
    case["bias"].requires_grad_(True)
    kw = dict(loss_type="dapo", temperature=1.7, beta=0.1)
    expected, got = run(reference_grpo_loss, case, **kw), run(fused_grpo_loss, case, backend="cpu", **kw)
    assert_same(expected, got)
    assert got[2]["weight"] is None and got[2]["bias"] is not None


@pytest.mark.parametrize("shape", [(1, 1, 8, 1031), (2, 3, 5, 7), (4, 9, 12, 257)])
def test_odd_shapes(shape):
    B, T, H, V = shape
    case = make_case(B=B, T=T, H=H, V=V, empty_row=B > 2)
    kw = dict(loss_type="grpo", beta=0.02)
    assert_same(run(reference_grpo_loss, case, **kw), run(fused_grpo_loss, case, backend="cpu", **kw))


def test_fully_masked_batch_gives_zero_loss_and_zero_grad():
    case = make_case()
    case["mask"].zero_()
    loss, metrics, grads = run(fused_grpo_loss, case, loss_type="grpo", beta=0.1, backend="cpu")
    assert loss.item() == 0.0
    assert all(torch.isfinite(v).all() for v in metrics.values())
    assert torch.equal(grads["hidden"], torch.zeros_like(grads["hidden"]))


def test_masked_positions_get_zero_hidden_grad():
    case = make_case()
    _, _, grads = run(fused_grpo_loss, case, loss_type="dapo", backend="cpu")
    assert torch.equal(grads["hidden"][case["mask"] == 0], torch.zeros_like(grads["hidden"][case["mask"] == 0]))
    assert grads["hidden"][case["mask"] != 0].abs().sum() > 0


def torch_bf16_loss(hidden, weight, targets, mask, advantages, old_logprobs, ref_logprobs, bias, **kw):
    """What plain torch does in bf16: bf16 matmul (logits rounded to bf16), then fp32."""
    head = LogitTransform(kw.pop("temperature", 1.0), kw.pop("logit_scale", 1.0), kw.pop("final_logit_softcapping", None))
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    logp_all = torch.log_softmax(head.apply(z.float()), -1)
    safe = torch.where(mask != 0, targets, 0)
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * (mask != 0)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    if not kw.get("entropy_coef"):
        entropy = entropy.detach()
    inputs = policy_inputs(logp, mask, advantages, old_logprobs, ref_logprobs, entropy, kw.pop("sampling_logprobs", None))
    return grpo_objective(inputs, loss_params(**kw))


BF16_CASES = [dict(loss_type="grpo"), dict(loss_type="dapo", importance_sampling_level="sequence"),
              dict(loss_type="cispo"), dict(loss_type="dapo", entropy_coef=0.2),  # the entropy bonus's gradient
              dict(loss_type="vespo"), dict(loss_type="luspo", importance_sampling_level="sequence"),
              dict(loss_type="sapo", sampling_correction="token_truncate", sampling_correction_clip_max=1.05)]


@pytest.mark.filterwarnings("ignore:.*(luspo|vespo|weighs each sequence)")
@pytest.mark.parametrize("options", BF16_CASES, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_bf16_as_close_as_torch_bf16(options):
    """bf16 inputs: the distance to the fp32 reference (same bf16-rounded inputs) must be within
    2x torch's own bf16 computation's distance (plus a small floor for exact ties)."""
    case = make_case(dtype=torch.bfloat16, seed=3, sampling=True)
    kw = dict(options, beta=0.05, temperature=0.9)
    exact = run(reference_grpo_loss, case, **kw)
    ours = run(fused_grpo_loss, case, backend="cpu", **kw)
    torch_bf16 = run(torch_bf16_loss, case, **kw)

    def dist(x, y):
        return (x.float() - y.float()).abs().max().item()

    pairs = [("loss", exact[0], ours[0], torch_bf16[0])]
    pairs += [(f"metric {k}", exact[1][k], ours[1][k], torch_bf16[1][k]) for k in exact[1]]
    pairs += [(f"grad {k}", exact[2][k], ours[2][k], torch_bf16[2][k]) for k in exact[2]]
    for name, e, o, t in pairs:
        scale = e.float().abs().max().item()
        assert dist(o, e) <= 2 * dist(t, e) + 1e-3 * scale + 1e-6, name
        assert o.dtype == t.dtype, name


# ---------------------------------------------------------------- backend functions


def naive_forward(hidden, weight, bias, targets, temperature):
    z = (hidden.float() @ weight.float().T + (0 if bias is None else bias.float())) / temperature
    lse = torch.logsumexp(z, -1)
    logp = z.gather(1, targets.unsqueeze(1)).squeeze(1) - lse
    entropy = lse - (torch.softmax(z, -1) * z).sum(-1)
    return logp, lse, entropy


def test_backend_contract_forward_and_backward():
    g = torch.Generator().manual_seed(5)
    N, H, V, T = 11, 16, 1031, 0.6
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) / 2).requires_grad_()
    bias = torch.randn(V, generator=g).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    grad_logp = torch.randn(N, generator=g)
    logp, lse, entropy = naive_forward(hidden, weight, bias, targets, T)
    gh, gw, gb = torch.autograd.grad((logp * grad_logp).sum(), (hidden, weight, bias))

    with torch.no_grad():
        out = logprob_cpu.logprob_forward(hidden, weight, bias, targets, T, True)
        for got, want in zip(out, (logp, lse, entropy)):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert logprob_cpu.logprob_forward(hidden, weight, bias, targets, T, False)[2] is None
        bgh, bgw, bgb = logprob_cpu.logprob_backward(hidden, weight, bias, targets, out[1], grad_logp, T, True, True)
        torch.testing.assert_close(bgh, gh, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bgw, gw, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bgb, gb, rtol=1e-4, atol=1e-5)
        assert logprob_cpu.logprob_backward(hidden, weight, bias, targets, out[1], grad_logp, T, False, False)[1:] \
            == (None, None)
        _, _, _, dlogp_dh, dent_dh, logp_rows, ent_rows = logprob_cpu.logprob_forward_input_grad(
            hidden, weight, bias, targets, T, True)
        assert dent_dh is None and logp_rows is None and ent_rows is None
        torch.testing.assert_close(grad_logp[:, None] * dlogp_dh, gh, rtol=1e-4, atol=1e-5)


class OpShapes(TorchDispatchMode):
    """Records (op name, output shape, dtype) of every op."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.outputs.append((str(func), tuple(t.shape), t.dtype))
        return out

    @property
    def max_numel(self) -> int:
        """Elements of the largest tensor any op produced."""
        return max((math.prod(shape) for _, shape, _ in self.outputs), default=0)


@pytest.mark.parametrize("train_head", [False, True])
def test_never_materializes_n_by_v(train_head):
    case = make_case(B=4, T=8, H=8, V=1031, train_head=train_head, bias=False)
    n_tokens = int(case["mask"].sum())
    rows = logprob_cpu.chunk_rows(1031)
    assert rows < n_tokens
    with OpShapes() as probe:
        loss, _ = fused_grpo_loss(**case, loss_type="dapo", backend="cpu")
        loss.backward()
    weight_numel = case["weight"].numel()
    assert probe.max_numel <= max(rows * 1031, weight_numel)
    assert probe.max_numel < n_tokens * 1031


def test_frozen_head_gathers_rows_without_a_compacted_copy(monkeypatch):
    """A frozen head on the CPU: the op gathers each chunk's kept rows itself, so no [N, H] copy
    of hidden in its dtype (bf16 here; D and D' are fp32) is ever made; loss, metrics and
    gradients equal the compacting path's, and the masked rows' gradient is 0."""
    case = make_case(B=4, T=8, H=8, V=1031, train_head=False, bias=False, dtype=torch.bfloat16, seed=3)
    n_tokens = int(case["mask"].sum())
    assert 0 < n_tokens < case["mask"].numel()
    kw = dict(loss_type="dapo", beta=0.05, top_entropy_quantile=0.5, entropy_coef=0.01)

    def forward_copies():  # the forward's [N, H] bf16 outputs (the backward's are chunk temporaries)
        with OpShapes() as probe:
            fused_grpo_loss(backend="cpu", **case, **kw)
        return [o for o in probe.outputs if o[1] == (n_tokens, 8) and o[2] == torch.bfloat16]

    assert not forward_copies()
    got = run(lambda **a: fused_grpo_loss(backend="cpu", **a), case, **kw)
    monkeypatch.setattr(logprob_cpu, "GATHERS_ROWS", False)  # the Function compacts first, as before
    assert forward_copies()  # the probe does see the compacted copy
    want = run(lambda **a: fused_grpo_loss(backend="cpu", **a), case, **kw)
    assert_same(want, got, rtol=0, atol=0)
    assert not got[2]["hidden"][case["mask"] == 0].any()


def test_rows_of_hidden_that_no_view_flattens_are_gathered():
    """hidden [B, T, H] whose strides allow no [B*T, H] view (T-major memory, as a slice of a
    longer sequence gives): its rows are gathered by index all the same, with no [N, H] copy of
    hidden (bf16; D is fp32), and loss, metrics and gradients equal those of the same values
    stored contiguously."""
    case = make_case(B=3, T=5, H=16, V=1031, train_head=False, bias=False, seed=4, dtype=torch.bfloat16)  # 3-row chunks
    strided = case["hidden"].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # [B, T, H]
    assert strided.stride(-1) == 1 and not strided.is_contiguous() and torch.equal(strided, case["hidden"])
    with pytest.raises(RuntimeError):
        strided.view(-1, 16)
    kw = dict(loss_type="grpo", beta=0.02)
    n_tokens = int(case["mask"].sum())
    with OpShapes() as probe:
        fused_grpo_loss(backend="cpu", **{**case, "hidden": strided}, **kw)
    assert not [o for o in probe.outputs if o[1] == (n_tokens, 16) and o[2] == torch.bfloat16]
    want = run(lambda **a: fused_grpo_loss(backend="cpu", **a), case, **kw)
    got = run(lambda **a: fused_grpo_loss(backend="cpu", **a), {**case, "hidden": strided}, **kw)
    assert got[2]["hidden"].shape == strided.shape
    assert_same(want, got, rtol=0, atol=0)


# ---------------------------------------------------------------- selective_logprobs


def test_selective_logprobs_shapes_mask_and_entropy():
    case = make_case(bias=True)
    h, w, b, y, m = case["hidden"].detach(), case["weight"].detach(), case["bias"].detach(), case["targets"], case["mask"]
    y_safe = y.clamp(min=0)
    want_lp, _, want_ent = naive_forward(h.reshape(-1, h.shape[-1]), w, b, y_safe.reshape(-1), 1.3)
    lp, ent = selective_logprobs(h, w, y_safe, temperature=1.3, return_entropy=True, bias=b, backend="cpu")
    assert lp.shape == ent.shape == y.shape and lp.dtype == torch.float32
    torch.testing.assert_close(lp.reshape(-1), want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.reshape(-1), want_ent, rtol=1e-5, atol=1e-5)
    flat = selective_logprobs(h.reshape(-1, h.shape[-1]), w, y_safe.reshape(-1), temperature=1.3, bias=b)
    torch.testing.assert_close(flat, want_lp, rtol=1e-5, atol=1e-5)
    masked = selective_logprobs(h, w, y, temperature=1.3, bias=b, mask=m)  # -100 targets where masked
    torch.testing.assert_close(masked, lp * m, rtol=1e-5, atol=1e-5)
    assert not masked.requires_grad


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(hidden=torch.randn(4)), "hidden"),
        (dict(weight=torch.randn(5, 3)), "weight"),
        (dict(targets=torch.zeros(3, dtype=torch.long)), "targets"),
        (dict(targets=torch.full((4,), 5)), "targets"),
        (dict(bias=torch.zeros(3)), "bias"),
        (dict(temperature=-1.0), "temperature"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_selective_logprobs_errors(change, match):
    args = dict(hidden=torch.randn(4, 6), weight=torch.randn(5, 6), targets=torch.zeros(4, dtype=torch.long))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        selective_logprobs(**args)


def test_fused_loss_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        fused_grpo_loss(**make_case(), loss_type="grpo", backend="cuda")


# ---------------------------------------------------------------- the options of issue 18


OPTION_CASES = {
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "vespo": dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_neg=2.5),
    "no_bias_correction": dict(loss_type="dapo", use_bias_correction_kl=False),
    "off_policy_mask": dict(loss_type="grpo", off_policy_mask_threshold=0.02),
    "token_truncate": dict(loss_type="dapo", sampling_correction="token_truncate", sampling_correction_clip_max=1.05),
    "sequence_mask": dict(loss_type="sapo", sampling_correction="sequence_mask", sampling_correction_clip_max=1.3),
    "vespo_token_mask": dict(loss_type="vespo", sampling_correction="token_mask", sampling_correction_clip_min=0.95,
                             sampling_correction_clip_max=1.05),
    "top_entropy": dict(loss_type="dapo", top_entropy_quantile=0.3),
    "top_entropy_given": dict(loss_type="dapo", top_entropy_quantile=0.3, entropy_threshold=5.5),
    "entropy_bonus": dict(loss_type="dapo", entropy_coef=0.3),
    "entropy_bonus_masked": dict(loss_type="bnpo", entropy_coef=0.3, top_entropy_quantile=0.5),
    "scale": dict(loss_type="dapo", logit_scale=0.7),
    "softcap": dict(loss_type="grpo", final_logit_softcapping=2.0, logit_scale=1.5),
    "softcap_entropy": dict(loss_type="dapo", final_logit_softcapping=3.0, entropy_coef=0.2, top_entropy_quantile=0.6),
}


@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("name", sorted(OPTION_CASES))
def test_every_option_matches_reference(name, train_head):
    """Loss, metrics and every gradient (the entropy bonus's included), frozen head (the
    gradient-ready forward: d logp / dh and d entropy / dh in the forward) and trainable head (the
    recomputing backward), against the materialized reference."""
    case = make_case(seed=3 + sorted(OPTION_CASES).index(name), sampling=True, train_head=train_head)
    kw = dict(OPTION_CASES[name], beta=0.05, temperature=0.8)
    assert_same(run(reference_grpo_loss, case, **kw), run(fused_grpo_loss, case, backend="cpu", **kw))


@pytest.mark.parametrize("beta, level", [(0.0, "token"), (0.05, "token"), (0.0, "sequence")])
def test_step_threshold_skips_cold_rows(beta, level, monkeypatch):
    """With the step's threshold given, the gradient-ready forward computes d/dh only for the rows
    the loss can reach: the high-entropy ones, unless the KL term or a sequence-level ratio reaches
    every row. The result equals the reference either way."""
    case = make_case(B=4, T=9, seed=21, train_head=False, bias=False, empty_row=False)
    with torch.no_grad():
        _, ent = selective_logprobs(case["hidden"], case["weight"], case["targets"], temperature=0.8,
                                    return_entropy=True)
    # Between two tokens' entropies: a threshold equal to one (a quantile often is) could flip with
    # the ~1e-6 difference between the chunked and the materialized entropy.
    ranked = ent[case["mask"] != 0].sort().values
    k = int(0.75 * len(ranked))
    thr = float((ranked[k] + ranked[k + 1]) / 2)
    kw = dict(loss_type="dapo", beta=beta, importance_sampling_level=level, temperature=0.8, top_entropy_quantile=0.25,
              entropy_threshold=thr, entropy_coef=0.1)
    calls = []
    real = logprob_cpu.logprob_forward_input_grad
    monkeypatch.setattr(logprob_cpu, "logprob_forward_input_grad",
                        lambda *a, **k: calls.append(k["plan"]) or real(*a, **k))
    assert_same(run(reference_grpo_loss, case, **kw), run(fused_grpo_loss, case, backend="cpu", **kw))
    (plan,) = calls
    assert plan.entropy and plan.hot_threshold == thr
    assert plan.cold_logp == (beta != 0 or level == "sequence")


def test_a_wrong_row_plan_is_refused():
    """A gradient reaching a row the plan said needs none is an error, never a silent zero."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 8, generator=g, requires_grad=True)
    weight = torch.randn(50, 8, generator=g)
    targets = torch.randint(0, 50, (6,), generator=g)
    plan = RowGrads(entropy=False, hot_threshold=1e9, cold_logp=False)  # no row is hot
    logp, _ = selective_logprob(hidden, weight, None, targets, LogitTransform(), "cpu", plan=plan)
    with pytest.raises(RuntimeError, match="RowGrads"):
        logp.sum().backward()


@pytest.mark.parametrize("step", [None, 3, 5, 8])
def test_backend_contract_entropy_gradient_and_softcap(step):
    """logprob_backward with grad_entropy and a soft cap, and the gradient-ready forward's D and D'
    (all rows, and the hot rows of a plan), against autograd through materialized logits. With
    chunks of `step` rows (None: one chunk) the hot rows' entropy columns of several chunks share
    one product (at most step // 2 columns), or a chunk's get one of their own (more of them)."""
    g = torch.Generator().manual_seed(9)
    N, H, V, T, s, c = 13, 16, 1031, 0.7, 1.3, 2.5
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) / 2).requires_grad_()
    bias = torch.randn(V, generator=g).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    g_logp, g_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    for softcap in (None, c):
        head = LogitTransform(T, s, softcap)
        z = head.apply(hidden @ weight.T + bias)
        logp_all = torch.log_softmax(z, -1)
        logp = logp_all.gather(1, targets[:, None])[:, 0]
        ent = -(logp_all.exp() * logp_all).sum(-1)
        want = torch.autograd.grad((logp * g_logp + ent * g_ent).sum(), (hidden, weight, bias))
        with torch.no_grad():
            out = logprob_cpu.logprob_forward(hidden, weight, bias, targets, T, True, logit_scale=s, softcap=softcap)
            torch.testing.assert_close(out[0], logp.detach(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out[2], ent.detach(), rtol=1e-5, atol=1e-5)
            got = logprob_cpu.logprob_backward(hidden, weight, bias, targets, out[1], g_logp, T, True, True,
                                               logit_scale=s, softcap=softcap, entropy=out[2], grad_entropy=g_ent)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # D and D' (no soft cap)
        head = LogitTransform(T, s)
        z = head.apply(hidden @ weight.T + bias)
        ent = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
        ranked = ent.sort().values
        thr = float((ranked[6] + ranked[7]) / 2)  # between two rows' entropies: no tie to break
        for plan in (RowGrads(entropy=True), RowGrads(entropy=True, hot_threshold=thr, cold_logp=False),
                     RowGrads(entropy=True, hot_threshold=thr, cold_logp=True)):
            _, _, e, d_logp, d_ent, logp_rows, ent_rows = logprob_cpu.logprob_forward_input_grad(
                hidden, weight, bias, targets, T, True, logit_scale=s, plan=plan,
                chunk_bytes=None if step is None else 4 * V * step)
            torch.testing.assert_close(e, ent, rtol=1e-5, atol=1e-5)
            hot = ent >= thr if plan.hot_threshold is not None else torch.ones(N, dtype=torch.bool)
            rows = hot if not plan.cold_logp else torch.ones(N, dtype=torch.bool)
            assert torch.equal(ent_rows, hot)
            assert logp_rows is None if plan.cold_logp else torch.equal(logp_rows, hot)
            with torch.enable_grad():
                h = hidden.detach().requires_grad_()
                zz = head.apply(h @ weight.detach().T + bias.detach())
                lp_all = torch.log_softmax(zz, -1)
                (gl,) = torch.autograd.grad((lp_all.gather(1, targets[:, None])[:, 0] * g_logp).sum(), h, retain_graph=True)
                (ge,) = torch.autograd.grad((-(lp_all.exp() * lp_all).sum(-1) * g_ent).sum(), h)
            torch.testing.assert_close(g_logp[rows, None] * d_logp[rows], gl[rows], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(g_ent[hot, None] * d_ent[hot], ge[hot], rtol=1e-4, atol=1e-5)
            assert not d_logp[~rows].any() and not d_ent[~hot].any()


@pytest.mark.parametrize("name", ["entropy_bonus", "softcap", "vespo"])  # no per-call quantile: its mask flips with rounding
def test_options_bf16_as_close_as_torch_bf16(name):
    case = make_case(dtype=torch.bfloat16, seed=5, sampling=True)
    kw = dict(OPTION_CASES[name], beta=0.05, temperature=0.9)
    exact, ours, torch_bf16 = (run(f, case, **kw) for f in (reference_grpo_loss,
                                                             lambda **a: fused_grpo_loss(backend="cpu", **a),
                                                             torch_bf16_loss))

    def dist(x, y):
        return (x.float() - y.float()).abs().max().item()

    pairs = [("loss", exact[0], ours[0], torch_bf16[0])]
    pairs += [(f"grad {k}", exact[2][k], ours[2][k], torch_bf16[2][k]) for k in exact[2]]
    for label, e, o, t in pairs:
        assert dist(o, e) <= 2 * dist(t, e) + 1e-3 * e.float().abs().max().item() + 1e-6, label
