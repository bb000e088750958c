"""grpo_fast.lean_lora: peft LoRA linears whose adapter term is added inside one addmm, against
peft's own forward (outputs, every gradient, saved tensors), and the calls it leaves to peft."""
import copy

import pytest
import torch

from grpo_fast import onednn_gemm
from grpo_fast.lean_lora import use_lean_lora
from test_swiglu import _saved_bytes, _tiny_llama

ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft(model, seed=0, **lora):
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    cfg = dict(r=4, lora_alpha=8, target_modules=ALL_LINEARS)
    cfg.update(lora)
    peft_model = get_peft_model(model, LoraConfig(**cfg))
    with torch.no_grad():  # non-zero B: a fresh adapter's term is 0 and would hide a wrong sum
        g = torch.Generator().manual_seed(seed)
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return peft_model


def _run(model, ids):
    model.zero_grad(set_to_none=True)
    out, saved = _saved_bytes(lambda: model(input_ids=ids).logits)
    out.float().pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, saved


def _ids():
    return torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))


def test_switched_model_matches_peft_outputs_gradients_and_saved_tensors():
    plain = _peft(_tiny_llama())
    lean = copy.deepcopy(plain)
    assert use_lean_lora(lean) == 2 * len(ALL_LINEARS)
    out_p, grads_p, saved_p = _run(plain, _ids())
    out_l, grads_l, saved_l = _run(lean, _ids())
    torch.testing.assert_close(out_l, out_p)
    assert grads_p.keys() == grads_l.keys() and len(grads_p) == 2 * 2 * len(ALL_LINEARS)  # A and B
    for n in grads_p:
        torch.testing.assert_close(grads_l[n], grads_p[n], atol=1e-6, rtol=1e-5)
    assert saved_l <= saved_p  # x A^T and B, as lora_B kept; nothing more


def _elementwise_over_output(layer, x) -> list[str]:
    """aten::mul / aten::add calls, forward and backward, over a tensor of the output's shape."""
    with torch.profiler.profile(record_shapes=True) as prof:
        layer(x).sum().backward()
    out_shape = [x.shape[0], layer.base_layer.out_features]
    return [e.key for e in prof.key_averages(group_by_input_shape=True)
            if e.key in ("aten::mul", "aten::add", "aten::add_") and out_shape in e.input_shapes]


def test_no_elementwise_pass_over_the_layer_output():
    plain = _peft(torch.nn.Sequential(torch.nn.Linear(8, 12)), target_modules=["0"]).base_model.model[0]
    lean = copy.deepcopy(plain)
    use_lean_lora(lean)
    x = torch.randn(5, 8, requires_grad=True)
    # peft scales the [5, 12] product and adds it (and scales dL/dy in the backward)
    assert {"aten::mul", "aten::add"} <= set(_elementwise_over_output(plain, x))
    assert _elementwise_over_output(lean, x) == []


def test_dropout_in_training_draws_the_same_mask_as_peft():
    plain = _peft(_tiny_llama(), lora_dropout=0.3)
    lean = copy.deepcopy(plain)
    use_lean_lora(lean)
    plain.train(), lean.train()
    torch.manual_seed(5)
    out_p, grads_p, _ = _run(plain, _ids())
    torch.manual_seed(5)
    out_l, grads_l, _ = _run(lean, _ids())
    torch.testing.assert_close(out_l, out_p)
    for n in grads_p:
        torch.testing.assert_close(grads_l[n], grads_p[n], atol=1e-6, rtol=1e-5)
    # and the mask mattered: the eval-mode output differs
    lean.eval()
    with torch.no_grad():
        assert not torch.allclose(lean(input_ids=_ids()).logits, out_l)


def _same_forward(plain, lean, **kwargs):
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(lean(input_ids=ids, **kwargs).logits, plain(input_ids=ids, **kwargs).logits)


def test_two_active_adapters_add_both_terms():
    from peft import LoraConfig

    plain = _peft(_tiny_llama())
    plain.add_adapter("other", LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in plain.named_parameters():
            if "lora_B.other" in n:
                p.normal_(0, 0.1)
    for m in plain.modules():  # peft's model-level set_adapter takes one name; layers take several
        if hasattr(m, "lora_A") and hasattr(m, "set_adapter"):
            m.set_adapter(["default", "other"])
    lean = copy.deepcopy(plain)
    use_lean_lora(lean)
    _same_forward(plain, lean)
    with torch.no_grad():  # both terms count: without "other" the output moves
        for m in lean.modules():
            if hasattr(m, "lora_A") and hasattr(m, "set_adapter"):
                m.set_adapter(["default"])
        assert not torch.allclose(lean(input_ids=_ids()).logits, plain(input_ids=_ids()).logits)


@pytest.mark.parametrize("case", ["disabled", "merged", "dora", "lora_bias", "adapter_names", "hooked"])
def test_calls_the_lean_path_does_not_cover_run_peft_forward(case):
    lora = {"dora": {"use_dora": True}, "lora_bias": {"lora_bias": True}}.get(case, {})
    plain = _peft(_tiny_llama(), **lora)
    if case == "lora_bias":
        with torch.no_grad():
            for n, p in plain.named_parameters():
                if "lora_B" in n and n.endswith("bias"):
                    p.normal_(0, 0.1)
    lean = copy.deepcopy(plain)
    assert use_lean_lora(lean) == 2 * len(ALL_LINEARS)
    if case == "disabled":
        with plain.disable_adapter(), lean.disable_adapter():
            _same_forward(plain, lean)
        return
    if case == "merged":
        plain.merge_adapter(), lean.merge_adapter()
    if case == "hooked":  # a hook on lora_B (a user's, a profiler's) must still see its calls
        seen = []
        for m in lean.modules():
            if hasattr(m, "lora_B"):
                m.lora_B["default"].register_forward_hook(lambda *a: seen.append(1))
        _same_forward(plain, lean)
        assert len(seen) == 2 * len(ALL_LINEARS)
        return
    kwargs = {}
    if case == "adapter_names":  # per-sample adapters (peft allows them in eval mode only)
        plain.eval(), lean.eval()
        kwargs = {"adapter_names": ["default", "__base__", "default"]}
    _same_forward(plain, lean, **kwargs)


def test_switching_twice_keeps_one_wrapper_and_a_copy_uses_its_own_weights():
    lean = _peft(_tiny_llama())
    n = use_lean_lora(lean)
    assert use_lean_lora(lean) == n
    layer = lean.base_model.model.model.layers[0].self_attn.q_proj
    assert layer._peft_forward.__func__ is type(layer).forward  # peft's, not our wrapper
    twin = copy.deepcopy(lean)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if "lora_B" in name:
                p.zero_()
        base_only = twin.base_model.model(input_ids=_ids()).logits
        with twin.disable_adapter():
            torch.testing.assert_close(base_only, twin(input_ids=_ids()).logits)
        assert not torch.allclose(lean(input_ids=_ids()).logits, base_only)


def test_load_policy_switches_the_adapters(tmp_path):
    from grpo_fast.config import LoraConfig, ModelConfig
    from grpo_fast.train.model import load_policy
    from test_train_loop import make_tiny_model

    model, _, _ = load_policy(ModelConfig(name_or_path=str(make_tiny_model(tmp_path))), LoraConfig(r=4, lora_alpha=8))
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert layers and all("_peft_forward" in m.__dict__ for m in layers)


def test_a_4bit_base_matches_peft_forward(tmp_path):
    """bitsandbytes NF4 base layers (peft's lora.bnb.Linear4bit): the same outputs and gradients
    as peft's own forward on the same loaded model."""
    from grpo_fast.config import LoraConfig, ModelConfig
    from grpo_fast.train.model import load_policy
    from test_train_loop import make_tiny_model

    model, _, _ = load_policy(ModelConfig(name_or_path=str(make_tiny_model(tmp_path)), load_in_4bit=True,
                                          device="cpu"), LoraConfig(r=4, lora_alpha=8), seed=0)
    layers = [m for m in model.modules() if "_peft_forward" in m.__dict__]
    assert layers and all(type(m).__name__ == "Linear4bit" for m in layers)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    out_l, grads_l, _ = _run(model, ids)
    for m in layers:
        m.forward = m._peft_forward
    out_p, grads_p, _ = _run(model, ids)
    torch.testing.assert_close(out_l, out_p)
    for n in grads_p:
        torch.testing.assert_close(grads_l[n], grads_p[n], atol=1e-6, rtol=1e-5)


def test_an_unknown_base_layer_keeps_its_output():
    """The sum goes into a linear's fresh product in place; a base layer of another type might
    hold its output (here: it keeps the last one), so that gets an out-of-place sum."""
    class Remembering(torch.nn.Linear):
        def forward(self, x):
            self.last = super().forward(x)
            return self.last

    plain = _peft(torch.nn.Sequential(Remembering(8, 12)), target_modules=["0"]).base_model.model[0]
    lean = copy.deepcopy(plain)
    use_lean_lora(lean)
    x = torch.randn(2, 5, 8, requires_grad=True)
    y = lean(x)
    kept = torch.nn.functional.linear(x, lean.base_layer.weight, lean.base_layer.bias)
    torch.testing.assert_close(lean.base_layer.last.reshape(kept.shape), kept)  # not added into
    torch.testing.assert_close(y, plain(x))
    gx_lean, = torch.autograd.grad(y.sum(), x)
    gx_plain, = torch.autograd.grad(plain(x).sum(), x)
    torch.testing.assert_close(gx_lean, gx_plain)


def test_fp32_adapters_over_a_bf16_base_match_peft_bit_for_bit(monkeypatch):
    """peft's default for a bf16 model: fp32 adapters (autocast_adapter_dtype). peft promotes the
    base product to fp32 for the sum and casts back; the lean path does the same sums in the same
    dtypes (its addmm into the promoted copy): per layer, output and gradients bit-equal,
    and it leaves no scaled fp32 [N, out] pass behind (peft: the product's `* s`, forward and back).
    Through a whole model the gradients differ by bf16 rounding only (the backward's order of
    scaling differs, and bf16 activations carry that to the layers below). The fp32 x A^T on
    torch's own GEMM, as peft's (on oneDNN it sums in another order: tests/test_onednn_gemm.py)."""
    monkeypatch.setenv(onednn_gemm.SWITCH_OFF, "1")
    plain = _peft(_tiny_llama().to(torch.bfloat16))
    q_proj = plain.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.base_layer.weight.dtype == torch.bfloat16 and q_proj.lora_A["default"].weight.dtype == torch.float32
    lean = copy.deepcopy(plain)
    assert use_lean_lora(lean) == 2 * len(ALL_LINEARS)
    out_p, grads_p, _ = _run(plain, _ids())
    out_l, grads_l, _ = _run(lean, _ids())
    assert out_l.dtype == torch.bfloat16 and torch.equal(out_l, out_p)
    assert grads_p.keys() == grads_l.keys() and len(grads_p) == 2 * 2 * len(ALL_LINEARS)
    for n in grads_p:  # the backward scales (g B) where peft scales g: bf16 rounding apart, deeper down
        rel = (grads_l[n] - grads_p[n]).norm() / grads_p[n].norm()
        assert grads_l[n].dtype == torch.float32 and rel < 2e-2, (n, rel)
    layer, peft_layer = copy.deepcopy(q_proj), copy.deepcopy(q_proj)
    use_lean_lora(layer)
    x = torch.randn(5, q_proj.in_features, dtype=torch.bfloat16)
    results = []
    for m in (peft_layer, layer):  # one layer: the same ops on the same inputs, bit for bit
        xx = x.clone().requires_grad_(True)
        y = m(xx)
        y.float().square().sum().backward()
        results.append((y, xx.grad, m.lora_A["default"].weight.grad, m.lora_B["default"].weight.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert "aten::mul" in _elementwise_over_output(peft_layer, x.requires_grad_(True))
    assert "aten::mul" not in _elementwise_over_output(layer, x)


def test_adapters_in_a_narrower_dtype_than_the_base_run_peft_forward():
    """bf16 adapters over an fp32 base: peft's sum is fp32 (promotion goes the other way), which
    the lean path does not reproduce, so the call is peft's own (same output, and A, B in
    different dtypes likewise)."""
    plain = _peft(_tiny_llama())
    for m in plain.modules():
        if hasattr(m, "lora_A") and hasattr(m, "base_layer"):
            m.lora_A["default"].to(torch.bfloat16), m.lora_B["default"].to(torch.bfloat16)
    lean = copy.deepcopy(plain)
    use_lean_lora(lean)
    calls = []
    for m in lean.modules():
        if "_peft_forward" in m.__dict__:
            real = m._peft_forward
            m._peft_forward = lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k)
    _same_forward(plain, lean)
    assert len(calls) == 2 * len(ALL_LINEARS)
