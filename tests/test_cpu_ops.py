"""The sampler's native CPU decode kernels (grpo_fast.models.cpu_ops) against plain PyTorch:
few-row linear (tails of every tile dimension, bias, scale, accumulate, strided rows), the fused
silu(x Wg^T) * (x Wu^T), RMSNorm against HF's module, and the input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from grpo_fast.models import cpu_ops

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="native CPU kernels need AVX2+FMA and the _C build")


def ref_linear(x, w, b=None):
    out = x.double() @ w.double().t()
    return out if b is None else out + b.double()


# M around the 8-row vector and 32-row tile edges, N around the 3-row weight tile, K around the
# 128-step register block; N = 1,000: chunks of more than one run of 8 blocks written together,
# ending in a short run and a 1-row block.
@pytest.mark.parametrize("m", [1, 7, 8, 9, 31, 32, 33, 70])
@pytest.mark.parametrize("n,k", [(1, 5), (2, 128), (3, 129), (97, 300), (64, 1), (1000, 40)])
def test_linear_matches_torch(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    torch.testing.assert_close(cpu_ops.linear(x, w).double(), ref_linear(x, w), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(cpu_ops.linear(x, w, b).double(), ref_linear(x, w, b), atol=1e-4, rtol=1e-5)


def test_linear_into_scales_accumulates_and_takes_strided_rows():
    g = torch.Generator().manual_seed(0)
    big_x = torch.randn(20, 90, generator=g)
    x = big_x[:, 10:74]  # [20, 64], rows 90 floats apart
    w, b = torch.randn(40, 64, generator=g), torch.randn(40, generator=g)
    out = torch.randn(20, 100, generator=g)
    before = out.clone()
    cpu_ops.linear_into(out[:, 30:70], x, w, b, alpha=0.5, accumulate=True)
    want = before.clone()
    want[:, 30:70] += 0.5 * (x @ w.t()) + b
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-5)  # columns outside the view untouched
    cpu_ops.linear_into(out[:, 30:70], x, w)  # overwrite
    torch.testing.assert_close(out[:, 30:70], x @ w.t(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out[:, :30], want[:, :30], atol=0, rtol=0)


def test_linear_rounding_is_blocked_over_k():
    """A long K is summed in 128-step register blocks: the error stays at a blocked GEMM's level
    (a single running sum over K = 8192 would drift past this bound)."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(32, 8192, generator=g), torch.randn(48, 8192, generator=g)
    err = (cpu_ops.linear(x, w).double() - ref_linear(x, w)).abs().max().item()
    mkl = ((x @ w.t()).double() - ref_linear(x, w)).abs().max().item()
    assert err < 3 * mkl + 1e-4, (err, mkl)


@pytest.mark.parametrize("m,n,k", [(32, 96, 64), (5, 7, 33), (40, 1536, 576)])
def test_silu_mul_linear_matches_torch(m, n, k):
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g) * 2
    wg, wu = torch.randn(n, k, generator=g) / k**0.5, torch.randn(n, k, generator=g) / k**0.5
    want = F.silu(ref_linear(x, wg)) * ref_linear(x, wu)
    torch.testing.assert_close(cpu_ops.silu_mul_linear(x, wg, wu).double(), want, atol=1e-5, rtol=1e-5)


def test_silu_mul_extremes():
    """silu at large |g| (exp of a non-positive argument only: no overflow, no NaN)."""
    x = torch.tensor([[1.0]]).repeat(8, 1)
    wg = torch.tensor([[-200.0], [-30.0], [-1.0], [0.0], [1e-6], [2.0], [30.0], [200.0]])
    out = cpu_ops.silu_mul_linear(x, wg, torch.ones(8, 1))
    torch.testing.assert_close(out, F.silu(x @ wg.t()), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", [(32, 576), (3, 4, 64), (1, 5), (0, 8)])
def test_rms_norm_matches_hf_module(shape):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(len(shape))
    norm = LlamaRMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g))
    x = torch.randn(*shape, generator=g) * 3
    torch.testing.assert_close(cpu_ops.rms_norm(x, norm.weight.detach(), 1e-5), norm(x).detach(), atol=1e-5, rtol=1e-5)


def test_bad_inputs_name_the_argument():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="x: need a 2-D fp32"):
        cpu_ops.linear(x.double(), w)
    with pytest.raises(ValueError, match="weight: has 7 input features, x has 8"):
        cpu_ops.linear(x, torch.randn(6, 7))
    with pytest.raises(ValueError, match="weight: need a contiguous"):
        cpu_ops.linear(x, torch.randn(8, 6).t())
    with pytest.raises(ValueError, match=r"out: expected shape \(4, 6\)"):
        cpu_ops.linear_into(torch.empty(4, 5), x, w)
    with pytest.raises(ValueError, match=r"bias: need a contiguous fp32 \[6\]"):
        cpu_ops.linear(x, w, torch.randn(5))
    with pytest.raises(ValueError, match="differ in shape"):
        cpu_ops.silu_mul_linear(x, w, torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"weight: need a contiguous fp32 \[8\]"):
        cpu_ops.rms_norm(x, torch.randn(7), 1e-6)


def test_switch_off(monkeypatch):
    monkeypatch.setenv("GRPO_FAST_NO_CPU_LINEAR", "1")
    assert not cpu_ops.available()


@pytest.mark.parametrize("t,hq,hkv,d", [(32, 9, 3, 64), (3, 4, 4, 32), (1, 2, 1, 6)])
def test_rope_qk_matches_hf(t, hq, hkv, d, monkeypatch):
    """Native RoPE (and decode_fast_paths.Rotary on both of its paths) equals HF's
    apply_rotary_pos_emb with the model's own cos/sin."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from grpo_fast.models.decode_fast_paths import Rotary

    g = torch.Generator().manual_seed(t * hq + d)
    q, k = torch.randn(t, hq, d, generator=g), torch.randn(t, hkv, d, generator=g)
    ang = torch.randn(t, d // 2, generator=g) * 5
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()  # [T, D], halves repeated
    # HF: [B, H, T, D] with cos/sin [B, T, D]
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    want_q, want_k = want_q[0].transpose(0, 1), want_k[0].transpose(0, 1)
    got_q, got_k = cpu_ops.rope_qk(q, k, cos, sin)
    torch.testing.assert_close(got_q, want_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_k, want_k, atol=1e-6, rtol=1e-6)
    assert Rotary(cos, sin).native
    for rq, rk in (Rotary(cos, sin)(q, k), Rotary(cos, sin)(q.transpose(0, 1).contiguous().transpose(0, 1), k)):
        torch.testing.assert_close(rq, want_q, atol=1e-6, rtol=1e-6)  # native, then the torch form
        torch.testing.assert_close(rk, want_k, atol=1e-6, rtol=1e-6)
    monkeypatch.setenv("GRPO_FAST_NO_CPU_LINEAR", "1")
    assert not Rotary(cos, sin).native
    rq, rk = Rotary(cos, sin)(q, k)
    torch.testing.assert_close(rq, want_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rk, want_k, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="even D"):
        cpu_ops.rope_qk(q[..., :-1].contiguous(), k[..., :-1].contiguous(), cos, sin)
    with pytest.raises(ValueError, match=r"cos .* need \["):
        cpu_ops.rope_qk(q, k, cos[:, :-2].contiguous(), sin)


@pytest.mark.parametrize("t,hq,hkv,d", [(32, 9, 3, 64), (3, 4, 4, 32), (1, 2, 1, 6), (2, 3, 1, 20)])
def test_bf16_rope_is_hfs_bit_for_bit(t, hq, hkv, d, tmp_path):
    """A bf16 model's RoPE (cos / sin in bf16, as HF's rotary module returns them): the native
    kernel rounds each product and then the sum as torch's bf16 ops do, so it equals HF's
    apply_rotary_pos_emb bit for bit, on the 8-lane path (D / 2 = 32, 16) and the element-wise one
    (3, 10: a ragged 8-lane tail), and in the portable x86 build; Rotary takes it."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from grpo_fast.models.decode_fast_paths import Rotary
    from fresh_process import run_fresh

    g = torch.Generator().manual_seed(t * hq + d + 1)
    q, k = torch.randn(t, hq, d, generator=g).bfloat16(), torch.randn(t, hkv, d, generator=g).bfloat16()
    ang = torch.randn(t, d // 2, generator=g) * 5
    cos, sin = torch.cat((ang, ang), -1).cos().bfloat16(), torch.cat((ang, ang), -1).sin().bfloat16()
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    want_q, want_k = want_q[0].transpose(0, 1), want_k[0].transpose(0, 1)
    got_q, got_k = cpu_ops.rope_qk(q, k, cos, sin)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    # (an fp32 sum of the products, rounded once, is not HF's: the case tells them apart)
    once = (q.float() * cos[:, None].float() + torch.cat((-q[..., d // 2:], q[..., :d // 2]), -1).float()
            * sin[:, None].float()).bfloat16()
    assert not torch.equal(once, want_q) or t * hq * d < 100
    rotary = Rotary(cos, sin)
    assert rotary.native
    rq, rk = rotary(q, k)
    assert torch.equal(rq, want_q) and torch.equal(rk, want_k)
    torch.save((q, k, cos, sin), tmp_path / "in.pt")
    run_fresh(f"""
        import torch
        from grpo_fast.models import cpu_ops
        q, k, cos, sin = torch.load({str(tmp_path / "in.pt")!r})
        torch.save(cpu_ops.rope_qk(q, k, cos, sin), {str(tmp_path / "out.pt")!r})
        """, env={"GRPO_FAST_NO_AVX2": "1"})
    pq, pk = torch.load(tmp_path / "out.pt")
    assert torch.equal(pq, want_q) and torch.equal(pk, want_k)
    with pytest.raises(ValueError, match="one dtype"):
        cpu_ops.rope_qk(q, k, cos.float(), sin.float())


def test_linear_many_equals_one_call_per_weight():
    """Several weights over one x (q, k, v of a layer, with and without bias, row counts that
    do not fill a 3-row tile) give what separate linear calls give."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(33, 64, generator=g)
    ws = [torch.randn(n, 64, generator=g) for n in (96, 31, 32)]
    bs = [torch.randn(96, generator=g), None, torch.randn(32, generator=g)]
    outs = cpu_ops.linear_many(x, ws, bs)
    for out, w, b in zip(outs, ws, bs):
        torch.testing.assert_close(out.double(), ref_linear(x, w, b), atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match=r"weights\[1\]: has 63 input features"):
        cpu_ops.linear_many(x, [ws[0], torch.randn(4, 63)], [None, None])
    with pytest.raises(ValueError, match=r"biases\[0\]: need a contiguous fp32 \[96\]"):
        cpu_ops.linear_many(x, ws[:1], [torch.randn(95)])
    with pytest.raises(ValueError, match="equal, non-zero lengths"):
        cpu_ops.linear_many(x, ws, [None])


def _avx512_runs() -> bool:
    from grpo_fast.native import _C
    return bool(getattr(_C, "cpu_avx512", lambda: False)())


@pytest.mark.skipif(not _avx512_runs(), reason="this CPU has no AVX-512 F (or GRPO_FAST_NO_AVX512=1 is set)")
def test_avx512_tiles_equal_the_avx2_ones_bit_for_bit(tmp_path):
    """On AVX-512 the linear kernels run 6 weight rows x 32 x rows on zmm (csrc/linear_cpu.cpp's
    micro_tile_512) where AVX2 runs 3 x 32 on ymm; every output's sum over k runs in the same order
    either way, so the outputs are equal bit for bit: plain, with bias and LoRA terms, several
    weights in one call, and the fused SiLU gate, at row and weight-row counts that leave ragged
    tiles on both paths."""
    from fresh_process import run_fresh

    g = torch.Generator().manual_seed(5)
    cases = []
    for m, n, k in [(32, 1536, 576), (7, 25, 300), (33, 97, 129), (70, 13, 64), (17, 1000, 40)]:
        x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
        lora = [(torch.randn(5, k, generator=g), torch.randn(n, 5, generator=g), 0.5),
                (torch.randn(16, k, generator=g), torch.randn(n, 16, generator=g), 2.0)]
        cases.append((x, w, b, lora, torch.randn(n, k, generator=g)))
    torch.save(cases, tmp_path / "in.pt")
    code = f"""
        import torch
        from grpo_fast.models import cpu_ops
        outs = []
        for x, w, b, lora, w_up in torch.load({str(tmp_path / "in.pt")!r}):
            out = torch.empty(x.shape[0], w.shape[0])
            outs.append(cpu_ops.linear(x, w, b))
            outs.append(cpu_ops.linear_into(out, x, w, None, accumulate=False, lora=lora).clone())
            outs += cpu_ops.linear_many(x, [w, w_up], [b, None], [lora, []])
            outs.append(cpu_ops.silu_mul_linear(x, w, w_up, lora_gate=lora, lora_up=lora[:1]))
        torch.save(outs, {{path!r}})
        """
    run_fresh(code.replace("{path!r}", repr(str(tmp_path / "wide.pt"))))
    run_fresh(code.replace("{path!r}", repr(str(tmp_path / "avx2.pt"))), env={"GRPO_FAST_NO_AVX512": "1"})
    wide, avx2 = torch.load(tmp_path / "wide.pt"), torch.load(tmp_path / "avx2.pt")
    assert len(wide) == len(avx2) == 5 * len(cases)
    for a, b in zip(wide, avx2):
        assert torch.equal(a, b)
