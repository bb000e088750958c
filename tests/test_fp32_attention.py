"""grpo_fast.train.fp32_attention: HF's SDPA attention over bf16 CPU tensors computed in fp32 in
the training forward. The wrapper against SDPA on the upcast inputs (bit for bit), the registry
left as found (a user's own "sdpa" override kept, nesting), and the training forward's attention
calls in fp32 for a bf16 model, in bf16 under gradient checkpointing (whose recompute runs
outside the context)."""
import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from grpo_fast.train.fp32_attention import fp32_cpu_attention, in_fp32


class _Module(torch.nn.Module):  # what sdpa_attention_forward reads off the attention module
    is_causal = True
    num_key_value_groups = 2


def _qkv(dtype, rows=2, heads=4, kv_heads=2, q_len=5, k_len=7, dim=8):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, heads, q_len, dim, generator=g)
    k, v = (torch.randn(rows, kv_heads, k_len, dim, generator=g) for _ in range(2))
    allowed = torch.rand(rows, 1, q_len, k_len, generator=g) > 0.3
    allowed[..., 0] = True  # every query sees a key
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(dtype).min).to(dtype)
    return q.to(dtype), k.to(dtype), v.to(dtype), mask


def test_wrapper_is_sdpa_on_fp32_inputs_cast_back():
    q, k, v, mask = _qkv(torch.bfloat16)
    out, _ = in_fp32(sdpa_attention_forward)(_Module(), q, k, v, mask, dropout=0.0, scaling=None)
    want, _ = sdpa_attention_forward(_Module(), q.float(), k.float(), v.float(), mask.float(), dropout=0.0,
                                     scaling=None)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want.to(torch.bfloat16))
    bf16, _ = sdpa_attention_forward(_Module(), q, k, v, mask, dropout=0.0, scaling=None)
    assert bf16.shape == out.shape and (bf16.float() - out.float()).abs().max() < 0.05  # same math, bf16 noise


def test_fp32_inputs_pass_through_untouched():
    seen = []

    def attention(module, q, k, v, mask, **kw):
        seen.append((q, k, v, mask))
        return q, None

    q, k, v, mask = _qkv(torch.float32)
    in_fp32(attention)(_Module(), q, k, v, mask)
    assert all(a is b for a, b in zip(seen[0], (q, k, v, mask)))


def _local_sdpa():
    return ALL_ATTENTION_FUNCTIONS._local_mapping.get("sdpa")


def test_registry_is_left_as_found_and_a_users_override_is_kept():
    assert _local_sdpa() is None
    with fp32_cpu_attention() as on:
        assert on and ALL_ATTENTION_FUNCTIONS["sdpa"].__wrapped__ is sdpa_attention_forward
        with fp32_cpu_attention():  # nested: wraps the outer one, restores it
            assert ALL_ATTENTION_FUNCTIONS["sdpa"].__wrapped__.__wrapped__ is sdpa_attention_forward
        assert ALL_ATTENTION_FUNCTIONS["sdpa"].__wrapped__ is sdpa_attention_forward
    assert _local_sdpa() is None and ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward
    with fp32_cpu_attention(enabled=False) as on:
        assert not on and _local_sdpa() is None

    calls = []

    def users(module, q, *rest, **kw):
        calls.append(q.dtype)
        return sdpa_attention_forward(module, q, *rest, **kw)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = users
    try:
        with fp32_cpu_attention():
            q, k, v, mask = _qkv(torch.bfloat16)
            ALL_ATTENTION_FUNCTIONS["sdpa"](_Module(), q, k, v, mask, dropout=0.0, scaling=None)
        assert calls == [torch.float32] and ALL_ATTENTION_FUNCTIONS["sdpa"] is users
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]
    with pytest.raises(RuntimeError), fp32_cpu_attention():  # restored on an error too
        raise RuntimeError
    assert _local_sdpa() is None


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_forward_attends_in_fp32_for_a_bf16_model(checkpointing, monkeypatch):
    """completion_hidden (cached layout: prompts once, completions over their K/V) of a bf16 tiny
    Llama: every SDPA call of forward and backward gets fp32 q; under gradient checkpointing none
    does, so the recompute in the backward computes what the forward did."""
    from test_swiglu import _tiny_llama

    from grpo_fast.models.causal_lm import decoder_and_head
    from grpo_fast.train.packed_forward import completion_hidden
    from grpo_fast.train.rollout_batch import make_batch

    monkeypatch.setenv("GRPO_FAST_NO_CPU_TRAIN_ATTENTION", "1")  # SDPA itself (the native op: test_cpu_attention.py)
    model = _tiny_llama().to(torch.bfloat16).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    decoder, _ = decoder_and_head(model)
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **k: seen.append(q.dtype) or real(q, *a, **k))
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 90, (6,), generator=g).tolist() for _ in range(2)]
    comps = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (4, 7, 5, 6)]
    batch = make_batch([p for p in prompts for _ in range(2)], comps, pad_id=0)
    hidden = completion_hidden(decoder, batch, layout="packed" if checkpointing else "cached")
    assert hidden.dtype == torch.bfloat16 and seen
    hidden.float().square().sum().backward()
    assert set(seen) == ({torch.bfloat16} if checkpointing else {torch.float32})
    assert _local_sdpa() is None
