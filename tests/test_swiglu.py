"""grpo_fast.swiglu: silu(gate) * up with a lean backward, and the switch of a model's MLPs."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fresh_process import run_fresh
from grpo_fast.swiglu import silu_mul, use_lean_swiglu


def test_silu_mul_matches_autograd_reference_float64():
    g = torch.Generator().manual_seed(0)
    gate = (torch.randn(5, 7, generator=g, dtype=torch.float64) * 4).requires_grad_()  # large |g| too
    up = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(silu_mul, (gate, up))
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad((silu_mul(gate, up) * w).sum(), (gate, up))
    ref = torch.autograd.grad((F.silu(gate) * up * w).sum(), (gate, up))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_only_the_needed_gradient_is_computed():
    gate = torch.randn(3, 4, requires_grad=True)
    up = torch.randn(3, 4)  # no grad wanted
    silu_mul(gate, up).sum().backward()
    torch.testing.assert_close(gate.grad, torch.autograd.grad((F.silu(gate) * up).sum(), gate)[0])


_NATIVE_CHECK = """
import torch
from grpo_fast.swiglu import _native, silu_mul

g = torch.Generator().manual_seed(0)
for n in (1, 7, 8, 13, 100_003):  # tails of the 8-lane loops, and several of the pool's chunks
    gate = torch.randn(n, generator=g) * 6
    gate[: min(n, 6)] = torch.tensor([0.0, -0.0, 100.0, -100.0, 88.5, -90.0])[: min(n, 6)]  # sigmoid's ends
    up = torch.randn(n, generator=g)
    w = torch.randn(n, generator=g)
    assert _native(gate, up) is not None  # the core takes fp32 CPU tensors
    for want in ((True, True), (True, False), (False, True)):
        gt, ut = gate.clone().requires_grad_(want[0]), up.clone().requires_grad_(want[1])
        out = silu_mul(gt, ut)
        gd, ud = gate.double().requires_grad_(want[0]), up.double().requires_grad_(want[1])
        ref = torch.nn.functional.silu(gd) * ud
        torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=1e-6)
        got = torch.autograd.grad((out * w).sum(), [t for t in (gt, ut) if t.requires_grad])
        exp = torch.autograd.grad((ref * w.double()).sum(), [t for t in (gd, ud) if t.requires_grad])
        for a, b in zip(got, exp):
            torch.testing.assert_close(a.double(), b, rtol=2e-6, atol=1e-6)
print("ok")
"""


@pytest.mark.skipif(__import__("grpo_fast.native").native._C is None, reason="needs the native core (pip install -e .)")
@pytest.mark.parametrize("avx2", ["1", "0"])
def test_native_silu_mul_matches_float64_reference(avx2):
    """The CPU core's one-pass forward and backward (csrc/swiglu_cpu.cpp), AVX2 and baseline
    x86 builds (a fresh process each: the choice is made once per process), against autograd
    in float64 over sigmoid's whole range, each gradient alone and both."""
    assert run_fresh(_NATIVE_CHECK, env={"GRPO_FAST_NO_AVX2": "0" if avx2 == "1" else "1"}) == "ok"


_NATIVE_CHECK_BF16 = """
import torch
from grpo_fast.swiglu import _native, silu_mul

def l2(a, b):  # relative L2 error (an all-zero reference: the absolute one)
    return float((a.double() - b).norm()) / max(float(b.norm()), 1e-30)

g = torch.Generator().manual_seed(0)
for n in (1, 7, 8, 13, 100_003):
    gate = torch.randn(n, generator=g) * 6
    gate[: min(n, 6)] = torch.tensor([0.0, -0.0, 100.0, -100.0, 88.5, -90.0])[: min(n, 6)]
    gate, up, w = gate.bfloat16(), torch.randn(n, generator=g).bfloat16(), torch.randn(n, generator=g).bfloat16()
    assert _native(gate, up) is not None  # the core takes bf16 too
    for want in ((True, True), (True, False), (False, True)):
        gt, ut = gate.clone().requires_grad_(want[0]), up.clone().requires_grad_(want[1])
        gh, uh = gate.clone().requires_grad_(want[0]), up.clone().requires_grad_(want[1])
        out, theirs = silu_mul(gt, ut), torch.nn.functional.silu(gh) * uh
        assert torch.equal(out, theirs)  # the forward is PyTorch's two bf16 ops
        gd, ud = gate.double().requires_grad_(want[0]), up.double().requires_grad_(want[1])
        ref = torch.nn.functional.silu(gd) * ud
        got = torch.autograd.grad(out, [t for t in (gt, ut) if t.requires_grad], w)
        exp = torch.autograd.grad(ref, [t for t in (gd, ud) if t.requires_grad], w.double())
        hf = torch.autograd.grad(theirs, [t for t in (gh, uh) if t.requires_grad], w)
        for a, b, h in zip(got, exp, hf):
            assert a.dtype == torch.bfloat16 and l2(a, b) < 1e-2 and l2(a, b) <= l2(h, b) + 1e-4, (l2(a, b), l2(h, b))
print("ok")
"""


@pytest.mark.skipif(__import__("grpo_fast.native").native._C is None, reason="needs the native core (pip install -e .)")
@pytest.mark.parametrize("avx2", ["1", "0"])
def test_native_silu_mul_backward_in_bf16_beats_torchs_ops(avx2):
    """bf16: the forward is PyTorch's F.silu(gate) * up; the native backward's gradients are
    nearer float64 than PyTorch's bf16 ops' (which round after every step); AVX2 and baseline
    builds, each gradient alone and both."""
    assert run_fresh(_NATIVE_CHECK_BF16, env={"GRPO_FAST_NO_AVX2": "0" if avx2 == "1" else "1"}) == "ok"


def test_inputs_the_core_cannot_take_run_the_torch_ops():
    from grpo_fast.swiglu import _native

    g = torch.randn(4, 6)
    assert _native(g.t(), g.t()) is None  # not contiguous
    assert _native(g.half(), g.half()) is None  # fp16: no kernel
    assert _native(g.bfloat16(), g) is None  # two dtypes
    assert _native(g, g[:, :1].expand(4, 6)) is None  # broadcast
    gate = torch.randn(6, 4).t().requires_grad_()
    up = torch.randn(4, 6).bfloat16().float().requires_grad_()
    ours = torch.autograd.grad(silu_mul(gate, up).sum(), (gate, up))
    ref = torch.autograd.grad((F.silu(gate) * up).sum(), (gate, up))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def _saved_bytes(fn) -> int:
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_switched_model_has_the_same_outputs_and_gradients_and_saves_less():
    from peft import LoraConfig, get_peft_model

    base = _tiny_llama()
    for p in base.parameters():
        p.requires_grad_(False)
    plain = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj",
                                                                                "q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in plain.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    lean = copy.deepcopy(plain)
    assert use_lean_swiglu(lean) == 2  # both layers' MLPs
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))

    def run(model):
        model.zero_grad(set_to_none=True)
        out, saved = _saved_bytes(lambda: model(input_ids=ids).logits)
        (out.float().pow(2).mean()).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, saved

    out_p, grads_p, saved_p = run(plain)
    out_l, grads_l, saved_l = run(lean)
    torch.testing.assert_close(out_l, out_p)
    assert grads_p.keys() == grads_l.keys() and grads_p
    for n in grads_p:
        torch.testing.assert_close(grads_l[n], grads_p[n], atol=1e-6, rtol=1e-5)
    # One [B, T, I] fp32 tensor per layer fewer: silu(gate).
    assert saved_p - saved_l >= 2 * 3 * 11 * 64 * 4


def test_other_activations_are_left_alone():
    class GeluMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = self.up_proj = torch.nn.Linear(4, 8)
            self.down_proj = torch.nn.Linear(8, 4)
            self.act_fn = torch.nn.GELU()

    m = GeluMLP()
    forward = m.forward
    assert use_lean_swiglu(m) == 0
    assert m.forward == forward


if __name__ == "__main__":
    pytest.main([__file__])
