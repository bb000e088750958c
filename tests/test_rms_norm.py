"""grpo_fast.rms_norm: the families' RMSNorm with one native pass per row each way on the CPU,
against HF's module in float64 (outputs, dL/dx, dL/dw), AVX2 and baseline x86 builds, and the
inputs it leaves to the module."""
import copy

import pytest
import torch

from fresh_process import run_fresh
from grpo_fast.native import _C
from grpo_fast.rms_norm import rms_norm, use_lean_rms_norm
from test_swiglu import _tiny_llama

needs_core = pytest.mark.skipif(_C is None, reason="needs the native core (pip install -e .)")

_NATIVE_CHECK = """
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from grpo_fast.rms_norm import rms_norm

g = torch.Generator().manual_seed(0)
# 3 rows stay on one thread; 300 x 576 is spread over the pool; 4-D is Qwen3's per-head q/k norm
for shape in ((3, 13), (300, 576), (2, 5, 3, 64)):
    D = shape[-1]
    x = torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g) * 4
    x.view(-1, D)[0] = 0.0  # an all-zero row: r = 1 / sqrt(eps)
    w = torch.randn(D, generator=g)
    dy = torch.randn(shape, generator=g)
    ref = LlamaRMSNorm(D, eps=1e-5).double()
    with torch.no_grad():
        ref.weight.copy_(w.double())
    for train_w in (False, True):
        xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_(train_w)
        out = rms_norm(xt, wt, 1e-5)
        assert out is not None  # the core takes contiguous fp32 CPU tensors
        xd = x.double().requires_grad_()
        ref.weight.requires_grad_(train_w)
        want = ref(xd)
        torch.testing.assert_close(out.double(), want, rtol=2e-6, atol=2e-6)
        got = torch.autograd.grad((out * dy).sum(), [xt] + ([wt] if train_w else []))
        exp = torch.autograd.grad((want * dy.double()).sum(), [xd] + ([ref.weight] if train_w else []))
        for a, b in zip(got, exp):
            torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5)
print("ok")
"""


@needs_core
@pytest.mark.parametrize("avx2", ["1", "0"])
def test_native_rms_norm_matches_hf_in_float64(avx2):
    """A fresh process each: the AVX2 / baseline choice is made once per process."""
    assert run_fresh(_NATIVE_CHECK, env={"GRPO_FAST_NO_AVX2": "0" if avx2 == "1" else "1"}) == "ok"


_NATIVE_CHECK_BF16 = """
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from grpo_fast.rms_norm import rms_norm

def steps(a, b):  # distance in bf16 steps (values of one sign)
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()

def l2(a, b):  # relative L2 error (an all-zero reference: the absolute one)
    return float((a.double() - b).norm()) / max(float(b.norm()), 1e-30)

g = torch.Generator().manual_seed(0)
for shape in ((3, 13), (300, 576), (2, 5, 3, 64)):
    D = shape[-1]
    x = (torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g) * 4).bfloat16()
    x.view(-1, D)[0] = 0.0
    w = torch.randn(D, generator=g).bfloat16()
    dy = torch.randn(shape, generator=g).bfloat16()
    hf = LlamaRMSNorm(D, eps=1e-5).bfloat16()
    with torch.no_grad():
        hf.weight.copy_(w)
    for train_w in (False, True):
        xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_(train_w)
        out = rms_norm(xt, wt, 1e-5)
        assert out is not None and out.dtype == torch.bfloat16  # the core takes bf16 too
        # forward: HF's module in bf16, rounding for rounding (the sum of squares in another
        # order may put x * r one bf16 step apart, two after the weight's product rounds again)
        xh = x.clone().requires_grad_()
        hf.weight.requires_grad_(train_w)
        want = hf(xh)
        assert int(steps(out.detach(), want.detach()).max()) <= 2
        assert float((out == want).float().mean()) >= 0.999
        # backward: against float64 autograd on the same bf16 values, closer than HF's bf16 autograd
        xd, wd = x.double().requires_grad_(), w.double().requires_grad_(train_w)
        ref = wd * (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5))
        exp = torch.autograd.grad(ref, [xd] + ([wd] if train_w else []), dy.double())
        got = torch.autograd.grad(out, [xt] + ([wt] if train_w else []), dy)
        theirs = torch.autograd.grad(want, [xh] + ([hf.weight] if train_w else []), dy)
        for a, b, h in zip(got, exp, theirs):
            assert a.dtype == torch.bfloat16 and l2(a, b) < 1e-2 and l2(a, b) <= l2(h, b), (l2(a, b), l2(h, b))
print("ok")
"""


@needs_core
@pytest.mark.parametrize("avx2", ["1", "0"])
def test_native_rms_norm_in_bf16_rounds_as_hf_does(avx2):
    """bf16: the forward as HF's module in bf16 (at most two bf16 steps apart, >= 99.9% equal), the
    gradients nearer float64 than HF's bf16 autograd; AVX2 and baseline builds."""
    assert run_fresh(_NATIVE_CHECK_BF16, env={"GRPO_FAST_NO_AVX2": "0" if avx2 == "1" else "1"}) == "ok"


def test_inputs_the_core_cannot_take_are_left_to_the_module():
    x = torch.randn(4, 8)
    w = torch.randn(8)
    assert rms_norm(x.t().contiguous().t(), w, 1e-6) is None  # not contiguous
    assert rms_norm(x.half(), w.half(), 1e-6) is None  # fp16: no kernel
    assert rms_norm(x.bfloat16(), w, 1e-6) is None  # two dtypes
    assert rms_norm(x, torch.randn(4), 1e-6) is None  # weight not [H]
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm = LlamaRMSNorm(8)
    plain = copy.deepcopy(norm)
    assert use_lean_rms_norm(norm) == 1
    for inp in (x.t().contiguous().t(), x.half()):
        torch.testing.assert_close(norm.to(inp.dtype)(inp), plain.to(inp.dtype)(inp))


def test_other_norms_are_not_switched():
    class GemmaRMSNorm(torch.nn.Module):  # y = (1 + w) * ...: another formula under a similar name
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4))
            self.variance_epsilon = 1e-6

    m = torch.nn.Sequential(GemmaRMSNorm(), torch.nn.LayerNorm(4))
    assert use_lean_rms_norm(m) == 0
    assert "forward" not in m[0].__dict__


@needs_core
def test_switched_model_has_the_same_outputs_and_gradients():
    """A tiny Llama trained in full (the norms' weights get gradients too), switched vs not."""
    plain = _tiny_llama()
    lean = copy.deepcopy(plain)
    assert use_lean_rms_norm(lean) == 2 * 2 + 1  # two per layer, and the final norm
    assert use_lean_rms_norm(lean) == 5  # again: unchanged
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for model in (plain, lean):
        out = model(input_ids=ids).logits
        out.pow(2).mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[1], outs[0])
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=1e-4, msg=n)
    with torch.no_grad(), torch.profiler.profile() as prof:  # and it ran the core, not the module's ops
        lean(input_ids=ids)
    assert not any(e.key == "aten::pow" for e in prof.key_averages())


def test_train_and_eval_keep_the_norms_switched(tmp_path, monkeypatch):
    """transformers re-kernelizes a model at train() / eval() (hub kernels, on where the `kernels`
    package is installed), which put the class forward back over every lean norm: after the
    first sampling phase the training pass ran HF's norms. load_policy's model keeps them
    through both, and a forward after them runs every norm natively."""
    import grpo_fast.rms_norm as rn
    from grpo_fast.config import load_config
    from grpo_fast.train.model import load_policy
    from test_train_loop import make_tiny_model

    tiny = make_tiny_model(tmp_path / "tiny")
    cfg = load_config(None, {"model.name_or_path": str(tiny), "lora.r": 2, "lora.lora_alpha": 4})
    model, _, _ = load_policy(cfg.model, cfg.lora, seed=0)
    calls = []
    real = rn.rms_norm
    monkeypatch.setattr(rn, "rms_norm", lambda *a: calls.append(1) or real(*a))
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    for switch in (model.eval, model.train, model.eval, model.train):
        switch()
        calls.clear()
        model(input_ids=torch.tensor([[1, 2, 3]]))
        assert len(calls) == len(norms) > 0
