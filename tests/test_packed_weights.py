"""The bf16 decode on oneDNN-packed weights (models/decode_fast_paths.FastPaths.packed): within a
generate call each bf16 base weight is reordered once and every product is x W^T + b from it.

It is F.linear bit for bit, so a plain bf16 model samples exactly what the W x^T paths sample; a
LoRA-wrapped one adds peft's fp32 adapters into the rows (the row-major native add) and equals
peft's forward to bf16 noise; weights changed between calls (an optimizer step on the base or the
adapters) are seen by the next call, since the packed copies live for one call only.
"""
import pytest
import torch

from grpo_fast.models import cpu_ops
from grpo_fast.models import decode_fast_paths as dfp
from grpo_fast.sampler import Sampler
from test_lora_bf16 import TARGETS, bf16_lora_model, greedy, logprobs, peft_forward_greedy, scale_lora_b, tokens
from test_sampler import _one_thread, random_prompts, tiny_model  # noqa: F401 (autouse fixture)

pytestmark = [pytest.mark.skipif(not cpu_ops.available(), reason="native CPU kernels need AVX2+FMA"),
              pytest.mark.skipif(not dfp._packing_available(), reason="this torch has no oneDNN packed linear")]


@pytest.mark.parametrize("rows", [1, 3, 8, 32, 33, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_the_packed_product_is_f_linear_bit_for_bit(rows, bias):
    torch.manual_seed(rows)
    base = torch.nn.Linear(72, 200, bias=bias).to(torch.bfloat16)
    packed = dfp._pack(base)
    assert packed is not None
    x = torch.randn(rows, 72).bfloat16()
    with torch.no_grad():
        want = torch.nn.functional.linear(x, base.weight, base.bias)
        assert torch.equal(dfp._base_product(x, base, packed), want)
        strided = torch.randn(rows, 100).bfloat16()[:, :72]  # rows apart by more than their length
        assert torch.equal(dfp._base_product(strided, base, packed),
                           torch.nn.functional.linear(strided, base.weight, base.bias))


def test_only_bf16_cpu_weights_pack_and_only_within_a_scope(monkeypatch):
    fast = dfp.FastPaths()
    lin = torch.nn.Linear(16, 8).to(torch.bfloat16)
    parts = fast.parts(lin)
    assert fast.packed(parts) is None  # outside a scope: a reorder per call would cost more than it saves
    with fast.scope():
        first = fast.packed(parts)
        assert first is not None and fast.packed(parts) is first  # once per scope
    with fast.scope():
        assert fast.packed(parts) is not first  # a new scope packs the weight as it is now
        assert fast.packed(fast.parts(torch.nn.Linear(16, 8))) is None  # fp32: the native kernels' path
    monkeypatch.setenv("GRPO_FAST_NO_PACKED_WEIGHTS", "1")
    with fast.scope():
        assert fast.packed(parts) is None


def _sample_both_ways(monkeypatch, model, prompts):
    """(sampler, packed outputs, W x^T outputs, the modules' Parts each packed product was of)."""
    sampler = Sampler(model, None, block_size=4, kv_budget="2048 tokens")
    taken = []
    real = dfp.FastPaths._packed_rows
    monkeypatch.setattr(dfp.FastPaths, "_packed_rows", lambda self, p, x: taken.append(p) or real(self, p, x))
    packed = greedy(sampler, prompts)
    count = len(taken)
    with monkeypatch.context() as m:
        m.setenv("GRPO_FAST_NO_PACKED_WEIGHTS", "1")
        plain = greedy(sampler, prompts)
    assert len(taken) == count  # the switch turns the path off
    return sampler, packed, plain, taken


def test_a_plain_bf16_model_samples_exactly_what_the_w_xt_paths_sample(monkeypatch):
    """Every block linear and the LM head of a plain bf16 model on the packed path (counted: 7 per
    layer and forward, and the head), tokens and log-probs bitwise those of the W x^T paths; a
    base weight changed in place between calls (full fine-tuning's optimizer step) is seen by the
    next call."""
    model = tiny_model("llama", seed=3).to(torch.bfloat16).eval()
    prompts = random_prompts((3, 9, 17), seed=7)
    sampler, packed, plain, taken = _sample_both_ways(monkeypatch, model, prompts)
    heads = sum(p.base is model.lm_head for p in taken)
    assert heads >= 8 and len(taken) - heads >= 7 * 2 * 8  # per forward (the prefill, 7 decode steps)
    assert tokens(packed) == tokens(plain)
    assert torch.equal(logprobs(packed), logprobs(plain))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(-2.0)
    _, after, after_plain, _ = _sample_both_ways(monkeypatch, model, prompts)
    assert torch.equal(logprobs(after), logprobs(after_plain))
    assert tokens(after) == tokens(after_plain)
    assert tokens(after) != tokens(packed) or (logprobs(after) - logprobs(packed)).abs().max() > 0.1


def test_a_lora_bf16_policy_adds_its_adapters_into_the_rows_and_equals_peft(monkeypatch):
    """A LoRA-wrapped bf16 model: the base products packed, every adapter through the row-major
    native add (counted), peft's forward's tokens and log-probs to bf16 noise; an update of
    lora_B shows in the next call."""
    model = bf16_lora_model(seed=4)
    rows = []
    real_rows = cpu_ops.lora_add_bf16_checked_
    monkeypatch.setattr(cpu_ops, "lora_add_bf16_checked_", lambda *a: rows.append(1) or real_rows(*a))
    prompts = random_prompts((3, 9, 17), seed=5)
    sampler, packed, _, taken = _sample_both_ways(monkeypatch, model, prompts)
    adapted = [p for p in taken if p.terms]
    assert len(adapted) >= 7 * 2 * 8 and len(rows) >= len(adapted)  # each got its adapters added
    module_path = peft_forward_greedy(sampler, prompts, monkeypatch)
    assert tokens(packed) == tokens(module_path)
    torch.testing.assert_close(logprobs(packed), logprobs(module_path), atol=3e-2, rtol=0)
    scale_lora_b(model, -3.0)
    updated = greedy(sampler, prompts)
    updated_module_path = peft_forward_greedy(sampler, prompts, monkeypatch)
    assert tokens(updated) == tokens(updated_module_path)  # the live adapters, not a stale copy
    torch.testing.assert_close(logprobs(updated), logprobs(updated_module_path), atol=3e-2, rtol=0)
    assert tokens(updated) != tokens(packed) or (logprobs(updated) - logprobs(packed)).abs().max() > 0.1


@pytest.mark.parametrize("kind, targets", [("llama", TARGETS), ("qwen2", TARGETS),
                                            ("llama", ["q_proj", "v_proj", "down_proj"])])
def test_the_packed_mlp_and_q_k_v_compute_the_modules(kind, targets):
    """Within a scope: q, k, v (Qwen2's with biases) and the gated MLP on packed weights, LoRA-
    wrapped (every block linear, or some: the others plain beside them), equal the modules to
    bf16 noise."""
    from peft import LoraConfig, get_peft_model

    base = tiny_model(kind, seed=6).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                            target_modules=targets)).eval()
    layer = model.base_model.model.model.layers[1]
    attn, mlp = layer.self_attn, layer.mlp
    x = torch.randn(7, attn.q_proj.in_features).bfloat16()
    into = torch.randn(7, mlp.down_proj.out_features).bfloat16()
    fast = dfp.FastPaths()
    with torch.no_grad(), fast.scope():
        got = fast.linears((attn.q_proj, attn.k_proj, attn.v_proj), x)
        got_mlp = fast.gated_mlp_add_(into.clone(), mlp, x).float()
        assert fast.packed(fast.parts(attn.q_proj)) is not None
        want = [m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
        want_mlp = into.float() + mlp(x).float()
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.is_contiguous()
        torch.testing.assert_close(g.float(), w.float(), atol=1e-2, rtol=2 ** -6)
    torch.testing.assert_close(got_mlp, want_mlp, atol=1e-2, rtol=2 ** -6)
