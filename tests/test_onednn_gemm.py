"""grpo_fast.onednn_gemm: fp32 products on oneDNN against torch's (MKL's), outputs and gradients,
when the path applies, and the training forward's base products taking it (lean_lora)."""
import copy

import pytest
import torch

from grpo_fast import onednn_gemm
from grpo_fast.lean_lora import use_lean_lora

pytestmark = pytest.mark.skipif(not onednn_gemm.available(),
                                reason="this torch build has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_linear_matches_torch(rows, bias):
    x, w = _rand(rows, 96, seed=1), _rand(80, 96, seed=2)
    b = _rand(80, seed=3) if bias else None
    torch.testing.assert_close(onednn_gemm.linear(x, w, b), torch.nn.functional.linear(x, w, b),
                               rtol=1e-5, atol=1e-5)


def test_linear_reads_strided_operands_and_leading_dims():
    x = _rand(2, 5, 48, seed=1)
    wt = _rand(48, 40, seed=2)  # W^T stored: W = wt.t() is a strided view
    torch.testing.assert_close(onednn_gemm.linear(x, wt.t()), x @ wt, rtol=1e-5, atol=1e-5)
    xs = _rand(48, 9, seed=3).t()  # rows 1 apart, columns 9 apart
    torch.testing.assert_close(onednn_gemm.linear(xs, wt.t()), xs @ wt, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight_grad", [False, True])
def test_autograd_function_matches_torch_gradients(weight_grad):
    x0, w0, b0 = _rand(33, 64, seed=1), _rand(48, 64, seed=2), _rand(48, seed=3)
    g = _rand(33, 48, seed=4)
    grads = []
    for fn in (lambda x, w, b: onednn_gemm.Linear.apply(x, w, b), torch.nn.functional.linear):
        x, w, b = (t.clone().requires_grad_(t is not w0 or weight_grad) for t in (x0, w0, b0))
        y = fn(x, w, b)
        y.backward(g)
        grads.append((y.detach(), x.grad, w.grad, b.grad))
    (y1, gx1, gw1, gb1), (y2, gx2, gw2, gb2) = grads
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb1, gb2, rtol=1e-5, atol=1e-5)
    if weight_grad:
        torch.testing.assert_close(gw1, gw2, rtol=1e-5, atol=1e-5)
    else:
        assert gw1 is None and gw2 is None


def test_a_frozen_weight_keeps_no_copy_of_the_input():
    x = _rand(16, 32, seed=1).requires_grad_(True)
    w = _rand(24, 32, seed=2)  # frozen: dL/dW is never needed, so x need not be kept
    y = onednn_gemm.Linear.apply(x, w, None)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    assert len(saved) == 1 and saved[0].data_ptr() == w.data_ptr()


def test_wants_only_fp32_cpu_and_not_with_the_switch(monkeypatch):
    x, w = _rand(4, 8), _rand(8, 8)
    assert onednn_gemm.wants(x, w)
    assert not onednn_gemm.wants(x.bfloat16(), w.bfloat16())
    assert not onednn_gemm.wants(x.double(), w.double())
    monkeypatch.setenv(onednn_gemm.SWITCH_OFF, "1")
    assert not onednn_gemm.wants(x, w)


@pytest.mark.parametrize("n,k", [(16, 96), (96, 16), (40, 40), (7, 130)])
def test_weight_grad_is_the_transposed_product_either_way_round(monkeypatch, n, k):
    """dL/dy^T x over 133 rows, short-wide and tall-narrow (the latter computed as (x^T dL/dy)^T):
    torch's product to fp32 rounding, on oneDNN, and torch's own with the switch off."""
    g, x = _rand(133, n, seed=1), _rand(133, k, seed=2)
    calls = _count_calls(monkeypatch)
    got = onednn_gemm.weight_grad(g, x)
    assert got.shape == (n, k) and len(calls) == 1
    torch.testing.assert_close(got, g.t() @ x, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv(onednn_gemm.SWITCH_OFF, "1")
    assert torch.equal(onednn_gemm.weight_grad(g, x), g.t().mm(x)) and len(calls) == 1


def test_lora_up_product_has_addmms_output_and_gradients(monkeypatch):
    """lean_lora's in-place y + s (xa B^T): addmm_'s output bit for bit (the same call), and its
    gradients (dL/dy itself, dL/dxa and dL/dB on oneDNN) to fp32 rounding; inputs that need no
    gradient get none."""
    from grpo_fast.lean_lora import _AddUpProduct

    y0, xa0, b0 = _rand(57, 40, seed=1), _rand(57, 16, seed=2), _rand(40, 16, seed=3)
    g = _rand(57, 40, seed=4)
    results = []
    for fn in (lambda y, xa, b: y.addmm_(xa, b.t(), alpha=0.7), lambda y, xa, b: _AddUpProduct.apply(y, xa, b, 0.7)):
        y, xa, b = (t.clone().requires_grad_(True) for t in (y0, xa0, b0))
        out = fn(y * 1, xa, b)  # y * 1: a fresh non-leaf, as the base product is
        out.backward(g)
        results.append((out.detach(), y.grad, xa.grad, b.grad))
    calls = _count_calls(monkeypatch)
    assert torch.equal(results[1][0], results[0][0]) and torch.equal(results[1][1], results[0][1])
    for got, want in zip(results[1][2:], results[0][2:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    y, xa = y0.clone(), xa0.clone().requires_grad_(True)  # B frozen: only dL/dxa
    _AddUpProduct.apply(y, xa, b0, 0.7).backward(g)
    assert len(calls) == 1 and xa.grad is not None


def _count_calls(monkeypatch) -> list[int]:
    calls = []
    real = onednn_gemm.linear

    def counted(x, weight, bias=None):
        calls.append(x.shape[0])
        return real(x, weight, bias)

    monkeypatch.setattr(onednn_gemm, "linear", counted)
    return calls


def test_lean_lora_base_products_run_on_onednn_and_match_peft(monkeypatch):
    from test_lean_lora import ALL_LINEARS, _ids, _peft, _run
    from test_swiglu import _tiny_llama

    plain = _peft(_tiny_llama())
    lean = copy.deepcopy(plain)
    use_lean_lora(lean)
    out_p, grads_p, _ = _run(plain, _ids())
    calls = _count_calls(monkeypatch)
    layers = sum(1 for n, _ in lean.named_modules() if n.endswith("q_proj") and "lora" not in n)
    lean.zero_grad(set_to_none=True)
    out_l = lean(input_ids=_ids()).logits
    assert len(calls) == 2 * layers * len(ALL_LINEARS)  # every LoRA layer's base product and x A^T
    out_l.float().pow(2).mean().backward()
    # and both input gradients, but for the first layer's q, k and v (below them: the frozen
    # embedding); and every layer's three adapter products: dL/dA, dL/d(x A^T), dL/dB
    n = layers * len(ALL_LINEARS)
    assert len(calls) == 2 * n + (2 * n - 2 * 3) + 3 * n
    grads_l = {n: p.grad for n, p in lean.named_parameters() if p.requires_grad}
    torch.testing.assert_close(out_l.detach(), out_p)
    for n in grads_p:
        torch.testing.assert_close(grads_l[n], grads_p[n], atol=1e-6, rtol=1e-5)
    calls.clear()
    monkeypatch.setenv(onednn_gemm.SWITCH_OFF, "1")
    _run(lean, _ids())
    assert calls == []


def test_prefill_products_of_more_than_small_m_rows_run_on_onednn(monkeypatch):
    """A prefill of more than SMALL_M fp32 rows: each projection's module(x) from oneDNN, LoRA
    terms added, equal to the modules' own output (fp32 rounding); a gated MLP too. Decode-sized
    inputs and grad mode keep their paths."""
    from grpo_fast.models.decode_fast_paths import SMALL_M, FastPaths
    from test_native_lora import lora_model

    model = lora_model("llama", dropout=0.0).eval()
    layer = model.base_model.model.model.layers[0]
    fast = FastPaths()
    x = _rand(SMALL_M + 44, 64, seed=1)
    calls = _count_calls(monkeypatch)
    with torch.inference_mode():
        for module in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            torch.testing.assert_close(fast.linear(module, x), module(x), rtol=1e-5, atol=1e-5)
        assert len(calls) == 2 * 2  # the base product and x A^T, each
        into = _rand(x.shape[0], 64, seed=2)
        want = into + layer.mlp(x)
        torch.testing.assert_close(fast.gated_mlp_add_(into, layer.mlp, x), want, rtol=1e-5, atol=1e-5)
        assert len(calls) == 2 * 2 + 3 * 2
        calls.clear()
        fast.linear(layer.self_attn.q_proj, x[:SMALL_M])  # a decode's rows: the native kernel
        assert calls == []
    fast.linear(layer.self_attn.q_proj, x)  # grad mode: the module
    assert calls == []


def test_sampler_prefill_on_onednn_gives_the_tokens_of_hf(monkeypatch):
    """A 300-token prompt (prefilled on oneDNN): greedy tokens and log-probs equal HF's, and
    those of the sampler with the switch off."""
    from test_native_lora import assert_same, greedy, lora_model
    from test_sampler import assert_matches_hf, random_prompts
    from grpo_fast.sampler import Sampler

    model = lora_model("llama", dropout=0.0).eval()
    sampler = Sampler(model, None, block_size=16, kv_budget="4096 tokens")
    prompts = random_prompts((300, 5))
    calls = _count_calls(monkeypatch)
    on = assert_matches_hf(model, sampler, prompts, n=2, max_tokens=6)
    assert calls, "the prefill did not run on oneDNN"
    monkeypatch.setenv(onednn_gemm.SWITCH_OFF, "1")
    assert_same(on, greedy(sampler, prompts, n=2, max_tokens=6), atol=1e-5)


def test_lean_lora_with_adapters_disabled_runs_the_base_on_onednn(monkeypatch):
    """The reference model's pass (adapters disabled): the base products on oneDNN, and peft's
    output (the base layers alone)."""
    from test_lean_lora import ALL_LINEARS, _ids, _peft
    from test_swiglu import _tiny_llama

    plain = _peft(_tiny_llama())
    lean = copy.deepcopy(plain)
    use_lean_lora(lean)
    calls = _count_calls(monkeypatch)
    with torch.no_grad(), plain.disable_adapter(), lean.disable_adapter():
        want, got = plain(input_ids=_ids()).logits, lean(input_ids=_ids()).logits
    layers = sum(1 for n, _ in lean.named_modules() if n.endswith("q_proj") and "lora" not in n)
    assert len(calls) == layers * len(ALL_LINEARS)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, lean(input_ids=_ids()).logits.detach())  # the adapters do count when on


def test_full_finetuning_linears_on_onednn_match_torch_outputs_and_every_gradient(monkeypatch):
    """lora.enabled: false trains every weight: its plain nn.Linear layers run on oneDNN (forward,
    dL/dx and dL/dW), with torch's outputs and gradients to fp32 rounding; a deep copy
    runs its own weights; hooks still fire."""
    from test_lean_lora import _ids
    from test_swiglu import _tiny_llama

    from grpo_fast.onednn_gemm import use_onednn_linears

    plain = _tiny_llama()
    fast = copy.deepcopy(plain)
    linears = sum(1 for m in fast.modules() if type(m) is torch.nn.Linear)
    assert use_onednn_linears(fast) == linears
    seen = []
    fast.model.layers[0].mlp.down_proj.register_forward_hook(lambda *a: seen.append(1))
    calls = _count_calls(monkeypatch)
    outs = []
    for model in (plain, fast):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=_ids()).logits
        logits.pow(2).mean().backward()
        outs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert calls and seen == [1]
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    for n, g in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][n], g, rtol=1e-4, atol=1e-6)
    twin = copy.deepcopy(fast)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
        assert not torch.allclose(twin(input_ids=_ids()).logits, fast(input_ids=_ids()).logits)
