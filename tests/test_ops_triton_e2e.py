"""End to end through grpo_fast.ops with backend="triton": the Triton kernels (on this CPU under
TRITON_INTERPRET=1, set by conftest.py; on a GPU for real) against the materialized reference."""
import importlib
import os

import pytest
import torch

try:
    importlib.import_module("grpo_fast.kernels.logprob")
    SKIP = None
except ImportError as err:  # CPU-only installs without triton
    SKIP = f"grpo_fast.kernels.logprob is not importable ({err})"
if SKIP is None and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    SKIP = "no CUDA device and TRITON_INTERPRET is not 1: the Triton kernels cannot run"
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

from grpo_fast.loss import LOSS_TYPE_NAMES, reference_grpo_loss  # noqa: E402
from grpo_fast.ops import fused_grpo_loss, selective_logprobs  # noqa: E402
from test_ops_cpu import OPTION_CASES, assert_same, make_case, naive_forward, run, torch_bf16_loss  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on_device(case):
    out = {}
    for k, v in case.items():
        if isinstance(v, torch.Tensor):
            leaf = v.detach().to(DEVICE)
            out[k] = leaf.requires_grad_(v.requires_grad)
        else:
            out[k] = v
    return out


def fused_triton(**kw):
    return fused_grpo_loss(backend="triton", **kw)


@pytest.mark.filterwarnings("ignore:.*(luspo|vespo|weighs each sequence)")
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPE_NAMES)
def test_every_loss_type_matches_reference(loss_type, level):
    case = on_device(make_case(B=3, T=3, H=16, V=67, seed=LOSS_TYPE_NAMES.index(loss_type)))
    kw = dict(loss_type=loss_type, beta=0.05, temperature=0.7, importance_sampling_level=level,
              epsilon_high=2.0 if loss_type == "cispo" else 0.28)
    assert_same(run(reference_grpo_loss, case, **kw), run(fused_triton, case, **kw))


def test_odd_vocab_bias_temperature_trainable_head():
    case = on_device(make_case(B=3, T=4, H=24, V=1031, seed=11))
    kw = dict(loss_type="dapo", beta=0.1, temperature=1.3)
    assert_same(run(reference_grpo_loss, case, **kw), run(fused_triton, case, **kw))


def test_single_token_on_policy_frozen_head():
    case = on_device(make_case(B=1, T=1, H=8, V=1031, old=False, ref=False, bias=False, train_head=False))
    expected, got = run(reference_grpo_loss, case, loss_type="grpo"), run(fused_triton, case, loss_type="grpo")
    assert_same(expected, got)
    assert got[2]["weight"] is None


def test_fully_masked_batch():
    case = on_device(make_case(B=2, T=3, H=8, V=67))
    case["mask"].zero_()
    loss, metrics, grads = run(fused_triton, case, loss_type="grpo", beta=0.1)
    assert loss.item() == 0.0 and torch.equal(grads["hidden"], torch.zeros_like(grads["hidden"]))


@pytest.mark.parametrize("options", [dict(loss_type="grpo"), dict(loss_type="dapo", entropy_coef=0.2),
                                     dict(loss_type="vespo", final_logit_softcapping=3.0)],
                         ids=["grpo", "entropy_bonus", "vespo_softcap"])
@pytest.mark.parametrize("train_head", [False, True])
def test_bf16_as_close_as_torch_bf16(options, train_head):
    """bf16 through the kernels (the entropy bonus's gradient included), frozen and trainable head."""
    case = on_device(make_case(B=3, T=3, H=16, V=67, dtype=torch.bfloat16, seed=3, train_head=train_head))
    kw = dict(options, beta=0.05, temperature=0.9)
    exact, ours, torch_bf16 = (run(f, case, **kw) for f in (reference_grpo_loss, fused_triton, torch_bf16_loss))

    def dist(x, y):
        return (x.float() - y.float()).abs().max().item()

    pairs = [("loss", exact[0], ours[0], torch_bf16[0])]
    assert [k for k in exact[2] if exact[2][k] is None] == [k for k in ours[2] if ours[2][k] is None]
    pairs += [(f"grad {k}", exact[2][k], ours[2][k], torch_bf16[2][k]) for k in exact[2] if exact[2][k] is not None]
    for name, e, o, t in pairs:
        assert dist(o, e) <= 2 * dist(t, e) + 1e-3 * e.float().abs().max().item() + 1e-6, name


def test_selective_logprobs_triton():
    case = on_device(make_case(B=2, T=3, H=16, V=1031, empty_row=False))
    h, w, b, y = (case[k].detach() for k in ("hidden", "weight", "bias", "targets"))
    lp, ent = selective_logprobs(h, w, y, temperature=0.8, return_entropy=True, bias=b, backend="triton")
    want_lp, _, want_ent = naive_forward(h.reshape(-1, 16), w, b, y.reshape(-1), 0.8)
    torch.testing.assert_close(lp.reshape(-1), want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.reshape(-1), want_ent, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("name", ["entropy_bonus_masked", "softcap_entropy", "top_entropy_given", "vespo_token_mask",
                                  "off_policy_mask", "scale"])
def test_options_match_reference(name, train_head):
    """The options through the Triton kernels: the entropy bonus's gradient (the recomputing
    backward, frozen head included), the logits' transform, masks and corrections."""
    case = on_device(make_case(B=3, T=3, H=16, V=67, seed=30, sampling=True, train_head=train_head))
    kw = dict(OPTION_CASES[name], beta=0.05, temperature=0.8)
    if name == "top_entropy_given":
        kw["entropy_threshold"] = 3.9  # ~ the median entropy of this case (V = 67: at most ln 67 = 4.2)
    assert_same(run(reference_grpo_loss, case, **kw), run(fused_triton, case, **kw))
