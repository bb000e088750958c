"""peft LoRA policies on the native decode path: the adapters computed inside the fused
projections of csrc/linear_cpu.cpp (A x as extra packed rows, B into the same output tile) and the
whole decoder stack as one native call (models/native_decode.py), from the live adapter weights.

Kernels against plain torch (x W^T + b + sum_l s_l (x A_l^T) B_l^T); the sampler on LoRA-wrapped
tiny models against HF generate / a full HF forward (greedy tokens equal, log-probs to 1e-4) and
against the per-module path (GRPO_FAST_NO_NATIVE_LAYER=1, to fp32 rounding), with one adapter,
two active adapters, a disabled adapter, in-place updates of the adapter between calls, and
lora_dropout > 0 in the config (sampling runs in eval mode). fp32, CPU.
"""
import pytest
import torch

from grpo_fast.models import cpu_ops
from grpo_fast.sampler import Sampler, SamplingParams
from test_sampler import _one_thread, assert_matches_hf, random_prompts, tiny_model  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="native CPU kernels need AVX2+FMA")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_ref(x, w, b, terms):
    out = x @ w.T + (0 if b is None else b)
    for a, bb, s in terms:
        out = out + s * (x @ a.T) @ bb.T
    return out


# K = 120 with rank 17: an adapter's k steps cross a 128-step register block of the base weight's;
# five adapters: more than one micro-tile sums in one go (the rest add in further passes)
@pytest.mark.parametrize("M,K,N", [(8, 64, 96), (37, 61, 45), (9, 120, 40), (70, 576, 192)])
@pytest.mark.parametrize("ranks", [(4,), (16, 1), (17,), (3, 2, 5, 1, 4)])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_kernels_with_lora_terms(M, K, N, ranks, threads):
    """linear_into (written and accumulated, with alpha), linear_many (a LoRA list per weight,
    one weight without any) and silu_mul_linear with adapters, against torch."""
    g = torch.Generator().manual_seed(M + K + N + sum(ranks))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(M, K, generator=g)
        w, bias = torch.randn(N, K, generator=g) / K ** 0.5, torch.randn(N, generator=g)
        terms = [(torch.randn(r, K, generator=g) / K ** 0.5, torch.randn(N, r, generator=g) / r ** 0.5, 0.5 + i)
                 for i, r in enumerate(ranks)]
        want = lora_ref(x, w, bias, terms)
        torch.testing.assert_close(cpu_ops.linear(x, w, bias, lora=terms), want, atol=1e-4, rtol=1e-4)
        into = torch.randn(M, N, generator=g)
        got = cpu_ops.linear_into(into.clone(), x, w, bias, alpha=0.5, accumulate=True, lora=terms)
        torch.testing.assert_close(got, into + 0.5 * lora_ref(x, w, None, terms) + bias, atol=1e-4, rtol=1e-4)
        w2 = torch.randn(N + 3, K, generator=g)
        outs = cpu_ops.linear_many(x, [w, w2], [bias, None], [terms, None])
        torch.testing.assert_close(outs[0], want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(outs[1], x @ w2.T, atol=1e-4, rtol=1e-4)
        wu = torch.randn(N, K, generator=g) / K ** 0.5
        up_terms = terms[:1]
        got = cpu_ops.silu_mul_linear(x, w, wu, lora_gate=terms, lora_up=up_terms)
        gate = lora_ref(x, w, None, terms)
        torch.testing.assert_close(got, torch.nn.functional.silu(gate) * lora_ref(x, wu, None, up_terms),
                                   atol=1e-4, rtol=1e-4)
    finally:
        torch.set_num_threads(old)


def test_lora_arguments_are_checked():
    x, w = torch.randn(8, 16), torch.randn(12, 16)
    with pytest.raises(ValueError, match=r"lora\[0\] B"):
        cpu_ops.linear(x, w, lora=[(torch.randn(4, 16), torch.randn(12, 5), 1.0)])
    with pytest.raises(ValueError, match=r"lora\[0\]: A is \(4, 15\)"):
        cpu_ops.linear(x, w, lora=[(torch.randn(4, 15), torch.randn(12, 4), 1.0)])


def lora_model(kind="llama", seed=0, dropout=0.1):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False, target_modules=TARGETS)
    return get_peft_model(tiny_model(kind, seed=seed), cfg)


def count_native(monkeypatch):
    from grpo_fast.models import native_decode

    calls = []
    real = native_decode.decode_forward
    monkeypatch.setattr(native_decode, "decode_forward", lambda *a: calls.append(1) or real(*a))
    return calls


def greedy(sampler, prompts, n=4, max_tokens=8):
    return sampler.generate(prompts, SamplingParams(n=n, temperature=0.0, max_tokens=max_tokens))


def assert_same(a, b, atol=1e-5):
    for ga, gb in zip(a, b):
        for ca, cb in zip(ga.completions, gb.completions):
            assert ca.token_ids == cb.token_ids
            torch.testing.assert_close(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=atol, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_lora_policy_runs_native_and_equals_hf_and_the_module_path(kind, monkeypatch):
    """12 sequences of a LoRA-wrapped model left in training mode (lora_dropout 0.1) take the
    native stack: it is not built while dropout is active, and the sampler runs the model in eval
    mode (and restores training mode). Greedy tokens and log-probs equal HF's; the per-module path
    gives the same to fp32 rounding. Qwen2 adds the q/k/v biases."""
    from grpo_fast.models.llama_family import LlamaFamily
    from grpo_fast.models.native_decode import native_layers

    model = lora_model(kind)
    model.train()  # active dropout: module(x) is random, only the modules compute it
    assert native_layers(LlamaFamily(model)) is None
    model.eval()
    layers = native_layers(LlamaFamily(model))
    assert layers is not None and layers.num_adapters == 7 * 2  # every block linear of both layers
    model.train()  # as the trainer leaves it: the sampler switches to eval mode for its calls
    calls = count_native(monkeypatch)
    sampler = Sampler(model, None, block_size=4, kv_budget="2048 tokens")
    prompts = random_prompts((3, 9, 17))
    from_train_mode = greedy(sampler, prompts)
    assert calls, "the native stack was not taken"
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert model.training and q_proj.lora_dropout["default"].training  # restored after the call
    native = assert_matches_hf(model.eval(), sampler, prompts, n=4, max_tokens=8)
    assert_same(from_train_mode, native, atol=0)
    monkeypatch.setenv("GRPO_FAST_NO_NATIVE_LAYER", "1")
    taken = len(calls)
    assert_same(native, greedy(sampler, prompts))
    assert len(calls) == taken


def test_two_active_adapters_a_disabled_adapter_and_live_updates(monkeypatch):
    """Two adapters active at once (peft sums them), an adapter disabled for a call, and an
    in-place update of lora_B between calls (what an optimizer step does) seen by the next call,
    all equal to HF, on the native stack."""
    from peft import LoraConfig

    model = lora_model("llama", seed=1, dropout=0.0)
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=6, init_lora_weights=False,
                                           target_modules=["q_proj", "v_proj", "down_proj"]))
    model.base_model.set_adapter(["default", "second"])
    model.eval()
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert list(q_proj.active_adapters) == ["default", "second"]
    calls = count_native(monkeypatch)
    sampler = Sampler(model, None, block_size=4, kv_budget="2048 tokens")
    prompts = random_prompts((5, 11), seed=3)
    both = assert_matches_hf(model, sampler, prompts, n=4, max_tokens=8)
    with model.disable_adapter():
        base = assert_matches_hf(model, sampler, prompts, n=4, max_tokens=8)
    assert [c.logprobs for o in both for c in o.completions] != [c.logprobs for o in base for c in o.completions]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(-2.0)  # in place: same storage, new values
    updated = assert_matches_hf(model, sampler, prompts, n=4, max_tokens=8)
    assert [c.logprobs for o in both for c in o.completions] != [c.logprobs for o in updated for c in o.completions]
    assert len(calls) > 0


def test_unsupported_lora_layers_keep_the_module_path():
    """DoRA and LoRA with a bias on B are not what the native kernels compute: the stack is not
    built and the modules are called."""
    from peft import LoraConfig, get_peft_model

    from grpo_fast.models.llama_family import LlamaFamily
    from grpo_fast.models.native_decode import native_layers

    dora = get_peft_model(tiny_model("llama"), LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    assert native_layers(LlamaFamily(dora)) is None
    biased = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_bias=True, target_modules=["v_proj"]))
    assert native_layers(LlamaFamily(biased)) is None
