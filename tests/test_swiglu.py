"""grpo_fast.swiglu: silu(gate) * up with a lean backward, and the switch of a model's MLPs."""
import copy

import pytest
import torch
import torch.nn.functional as F

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
