"""The training pass's native CPU attention (grpo_fast/train/cpu_attention.py,
csrc/train_attention_item.inc): outputs and q / k / v gradients against torch's SDPA under every
mask it takes (causal, boolean, additive), GQA ratios 1 to 18, head dims 32-128, ragged blocks;
zmm and ymm builds equal bit for bit; HF's attention routed through it in the training forward
(fp32 and bf16 models), with the same hidden states and gradients as SDPA."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fresh_process import run_fresh
from grpo_fast.train import cpu_attention
from grpo_fast.train.cpu_attention import TrainAttention, keep_mask

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="no native CPU training attention (no C++ build)")


def _qkv(B, Hq, Hkv, T, S, D, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).requires_grad_(True)
            for shape in ((B, Hq, T, D), (B, Hkv, S, D), (B, Hkv, S, D))]


def _cached_layout_mask(B, T, S, padded_keys=3):
    """Completions over a prompt: every prompt key visible, causal over their own; row 0's first
    keys are padding."""
    P = S - T
    m = torch.zeros(B, 1, T, S, dtype=torch.bool)
    m[..., :P] = True
    m[..., P:] = torch.tril(torch.ones(T, T, dtype=torch.bool))
    m[0, :, :, :padded_keys] = False
    return m


@pytest.mark.parametrize("B,Hq,Hkv,T,S,D,kind", [
    (2, 9, 3, 37, 37, 64, "causal"), (2, 9, 3, 37, 130, 64, "bool"), (3, 12, 2, 19, 150, 128, "additive"),
    (1, 4, 4, 70, 70, 40, "none"), (2, 18, 1, 100, 100, 32, "causal"), (2, 6, 2, 65, 200, 64, "bool"),
])
def test_outputs_and_gradients_match_sdpa(B, Hq, Hkv, T, S, D, kind):
    q, k, v = _qkv(B, Hq, Hkv, T, S, D, seed=T + S)
    mask, keep, causal = None, None, kind == "causal"
    if kind in ("bool", "additive"):
        mask = _cached_layout_mask(B, T, S)
        if kind == "additive":
            mask = torch.zeros(B, 1, T, S).masked_fill(~mask, torch.finfo(torch.float32).min)
        keep = keep_mask(mask, B, T, S)
    out = TrainAttention.apply(q, k, v, keep, causal, D ** -0.5)
    g = torch.randn_like(out)
    out.backward(g)
    got = [out.detach()] + [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    want.backward(g)
    for a, b in zip(got, [want.detach()] + [t.grad for t in (q, k, v)]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5)


def test_a_token_that_sees_no_key_gets_zeros_and_passes_no_gradient():
    q, k, v = _qkv(1, 3, 1, 4, 6, 16, seed=1)
    m = torch.ones(1, 1, 4, 6, dtype=torch.bool)
    m[0, 0, 2] = False  # token 2 attends nothing
    out = TrainAttention.apply(q, k, v, keep_mask(m, 1, 4, 6), False, 0.25)
    assert torch.equal(out[0, :, 2], torch.zeros(3, 16))
    g = torch.zeros_like(out)
    g[0, :, 2] = 1.0  # only the empty token's output has a gradient
    out.backward(g)
    assert not q.grad.any() and not k.grad.any() and not v.grad.any()


def test_keep_mask_takes_boolean_and_zero_or_minimum_masks_only():
    m = _cached_layout_mask(2, 5, 9)
    assert torch.equal(keep_mask(m, 2, 5, 9), m[:, 0].to(torch.uint8))
    additive = torch.zeros(2, 1, 5, 9).masked_fill(~m, float("-inf"))
    assert torch.equal(keep_mask(additive, 2, 5, 9), m[:, 0].to(torch.uint8))
    assert keep_mask(additive + 0.5 * (~m[:, :, :, :]).logical_not(), 2, 5, 9) is None  # a bias: not a mask
    assert keep_mask(m.expand(2, 3, 5, 9), 2, 5, 9) is None  # per-head masks
    assert keep_mask(m[:1], 2, 5, 9).shape == (1, 5, 9)  # broadcast over the batch


_ISA_CASES = """
    import torch
    from grpo_fast.train.cpu_attention import TrainAttention, keep_mask
    from test_cpu_attention import _cached_layout_mask, _qkv
    outs = []
    for B, Hq, Hkv, T, S, D in ((2, 9, 3, 37, 100, 64), (1, 12, 2, 50, 50, 128), (2, 7, 7, 20, 41, 40)):
        q, k, v = _qkv(B, Hq, Hkv, T, S, D, seed=D)
        keep = keep_mask(_cached_layout_mask(B, T, S), B, T, S) if S != T else None
        out = TrainAttention.apply(q, k, v, keep, S == T, D ** -0.5)
        out.backward(torch.ones_like(out))
        outs += [out.detach(), q.grad, k.grad, v.grad]
    torch.save(outs, {path!r})
    print("ok")
"""


def test_zmm_and_ymm_builds_are_equal_bit_for_bit(tmp_path):
    """Both ISA builds of the item do the same operations per output element in the same order."""
    from test_cascade_attention import _avx512_runs

    if not _avx512_runs():
        pytest.skip("this CPU has no AVX-512 F (or GRPO_FAST_NO_AVX512=1 is set): only the ymm build runs")
    env = {"PYTHONPATH": str(Path(__file__).parent)}
    paths = [tmp_path / "zmm.pt", tmp_path / "ymm.pt"]
    assert run_fresh(_ISA_CASES.format(path=str(paths[0])), env=env) == "ok"
    assert run_fresh(_ISA_CASES.format(path=str(paths[1])), env={**env, "GRPO_FAST_NO_AVX512": "1"}) == "ok"
    wide, ymm = torch.load(paths[0]), torch.load(paths[1])
    assert len(wide) == len(ymm) == 12
    for a, b in zip(wide, ymm):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["cached", "packed"])
def test_training_forward_runs_it_with_sdpas_results(monkeypatch, dtype, layout):
    """completion_hidden of a tiny Llama (both layouts; bf16 through fp32_attention's cast): every
    attention call goes through TrainAttention, and the hidden states and every LoRA-free weight's
    gradient equal SDPA's (the switch off) to fp32 rounding (bf16: its rounding)."""
    from test_swiglu import _tiny_llama

    from grpo_fast.models.causal_lm import decoder_and_head
    from grpo_fast.train.packed_forward import completion_hidden
    from grpo_fast.train.rollout_batch import make_batch

    monkeypatch.setattr(cpu_attention, "MIN_KEYS", 0)  # these rows are short
    calls = []
    real = TrainAttention.apply
    monkeypatch.setattr(TrainAttention, "apply", lambda *a: calls.append(a[0].dtype) or real(*a))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (6, 9)]
    comps = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (4, 7, 5, 6)]
    batch = make_batch([p for p in prompts for _ in range(2)], comps, pad_id=0)
    results = []
    for off in (False, True):
        if off:
            monkeypatch.setenv(cpu_attention.SWITCH_OFF, "1")
        torch.manual_seed(0)
        model = _tiny_llama().to(dtype).train()
        decoder, _ = decoder_and_head(model)
        hidden = completion_hidden(decoder, batch, layout=layout)
        hidden.float().square().sum().backward()
        results.append((hidden.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}))
    assert calls and set(calls) == {torch.float32}
    tol = dict(rtol=1e-3, atol=2e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)  # sums of ~1e3 terms
    torch.testing.assert_close(results[0][0], results[1][0], **tol)
    for n, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][n], grad, **tol)


def test_rows_of_fewer_than_min_keys_keep_sdpa(monkeypatch):
    """Below MIN_KEYS keys the wrapper hands the call to the attention it wraps, unchanged."""
    seen = []

    def sdpa(module, q, k, v, mask, **kw):
        seen.append(k.shape[2])
        return q.transpose(1, 2), None

    wrapped = cpu_attention.with_native_attention(sdpa)
    module = torch.nn.Module()
    q, k, v = _qkv(1, 4, 2, 8, 8, 16, seed=0)
    wrapped(module, q, k, v, None)
    assert seen == [8]
    monkeypatch.setattr(cpu_attention, "MIN_KEYS", 8)
    out, _ = wrapped(module, q, k, v, None)
    assert seen == [8] and out.shape == (1, 8, 4, 16)
