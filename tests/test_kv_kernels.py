"""KV kernels (append_kv, copy_blocks, paged decode attention, prefill attention) against the
plain-PyTorch references (SDPA over gathered K/V), on CPU and, under the gpu marker, on CUDA.

Tolerances: fp32 kernels accumulate in fp32 like the reference, so they agree to ~1e-6. A bf16
kernel reads bf16 K/V, accumulates in fp32 and rounds its output to bf16 once, exactly as the
reference does on the same bf16 inputs, so the two differ by at most one bf16 rounding (2^-8
relative); against the fp32 reference on the unrounded inputs it sits at torch's own bf16 error.
"""
import pytest
import torch
import torch.nn.functional as F

from fresh_process import run_fresh
from grpo_fast import kv
from grpo_fast.kv import reference as ref
from grpo_fast.native import has_native

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


def dtypes_for(device):
    return [torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])


def test_native_kernels_are_built():
    for op in ("append_kv", "copy_blocks", "paged_decode_attention", "prefill_attention", "sample"):
        assert has_native(op, "cpu"), op


def random_paged(S, lens, hkv, D, bs, dtype, device, gen):
    """A cache holding S sequences in shuffled blocks; returns (kc, vc, block_tables, lens)."""
    per = [-(-n // bs) for n in lens]
    max_blocks = max(max(per), 1)
    nb = sum(per) + 3  # a few blocks nobody owns
    kc = torch.randn(nb, bs, hkv, D, generator=gen).to(device, dtype)
    vc = torch.randn(nb, bs, hkv, D, generator=gen).to(device, dtype)
    perm = torch.randperm(nb, generator=gen)
    tables = torch.full((S, max_blocks), -1, dtype=torch.int32)
    i = 0
    for s, p in enumerate(per):
        tables[s, :p] = perm[i:i + p].int()
        i += p
    return kc, vc, tables.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (8, 1), (9, 3), (40, 2)])
@pytest.mark.parametrize("D", [64, 128, 40])
def test_paged_decode_attention_matches_reference(device, hq, hkv, D):
    gen = torch.Generator().manual_seed(hq * 1000 + D)
    lens = [1, 15, 16, 17, 33, 100, 0]  # around block boundaries, and an empty context
    for dtype in dtypes_for(device):
        kc, vc, tables, cl = random_paged(len(lens), lens, hkv, D, 16, dtype, device, gen)
        q = torch.randn(len(lens), hq, D, generator=gen).to(device, dtype)
        out = kv.paged_decode_attention(q, kc, vc, tables, cl, D ** -0.5)
        want = ref.paged_decode_attention(q, kc, vc, tables, cl, D ** -0.5)
        assert out.dtype == dtype and out.shape == q.shape
        torch.testing.assert_close(out.float(), want.float(), **TOL[dtype])
        assert torch.all(out[-1] == 0)  # context 0 -> zeros


@pytest.mark.parametrize("device", DEVICES)
def test_decode_attention_long_context_bf16_near_fp32(device):
    gen = torch.Generator().manual_seed(1)
    lens = [3000, 1234]
    kc, vc, tables, cl = random_paged(2, lens, 2, 64, 16, torch.float32, device, gen)
    q = torch.randn(2, 8, 64, generator=gen).to(device) * 3
    want = ref.paged_decode_attention(q, kc, vc, tables, cl, 0.125)
    out32 = kv.paged_decode_attention(q, kc, vc, tables, cl, 0.125)
    torch.testing.assert_close(out32, want, atol=1e-5, rtol=1e-5)
    qb, kb, vb = q.bfloat16(), kc.bfloat16(), vc.bfloat16()
    outb = kv.paged_decode_attention(qb, kb, vb, tables, cl, 0.125).float()
    torch_bf16 = ref.paged_decode_attention(qb, kb, vb, tables, cl, 0.125).float()
    # bf16 kernel error vs fp32 truth is no worse than torch's own computation on bf16 inputs
    err_ours, err_torch = (outb - want).abs().max(), (torch_bf16 - want).abs().max()
    assert err_ours <= err_torch * 1.5 + 1e-3, (err_ours, err_torch)


@pytest.mark.parametrize("device", DEVICES)
def test_block_manager_plus_kernels_equal_contiguous_attention(device):
    """Prefill a prompt into blocks, fork G children, decode with copy-on-write: every child's
    decode attention equals SDPA over its own contiguous K/V history."""
    gen = torch.Generator().manual_seed(0)
    bs, hkv, hq, D, P, G = 4, 2, 4, 64, 10, 3
    bm = kv.BlockManager(32, bs)
    kc = torch.zeros(32, bs, hkv, D, device=device)
    vc = torch.zeros_like(kc)
    pk = torch.randn(P, hkv, D, generator=gen).to(device)
    pv = torch.randn(P, hkv, D, generator=gen).to(device)
    assert bm.allocate(0, list(range(P))) == 0
    kv.append_kv(kc, vc, pk, pv, bm.slot_mapping(0).to(device))
    bm.fork(0, list(range(1, G + 1)))
    bm.free(0)
    hist = {c: (pk.clone(), pv.clone()) for c in range(1, G + 1)}
    for step in range(7):  # crosses a block boundary
        seqs = list(range(1, G + 1))
        for c in seqs:
            kv.copy_blocks(kc, vc, bm.append_token(c))
        slots, tables, lens = (x.to(device) for x in bm.decode_metadata(seqs))
        nk = torch.randn(G, hkv, D, generator=gen).to(device)
        nv = torch.randn(G, hkv, D, generator=gen).to(device)
        kv.append_kv(kc, vc, nk, nv, slots)
        q = torch.randn(G, hq, D, generator=gen).to(device)
        out = kv.paged_decode_attention(q, kc, vc, tables, lens, 0.125)
        for i, c in enumerate(seqs):
            k = torch.cat([hist[c][0], nk[i:i + 1]])
            v = torch.cat([hist[c][1], nv[i:i + 1]])
            hist[c] = (k, v)
            want = F.scaled_dot_product_attention(
                q[i].unsqueeze(1), k.transpose(0, 1), v.transpose(0, 1), scale=0.125,
                enable_gqa=True).squeeze(1)
            torch.testing.assert_close(out[i], want, atol=1e-5, rtol=1e-5)
    # 2 shared full prompt blocks + per child: its copy of the partial block and 2 new ones
    assert bm.num_free_blocks == 32 - (2 + 3 * G)


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_attention_matches_causal_sdpa(device):
    gen = torch.Generator().manual_seed(2)
    lens = [5, 0, 17, 40]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    T = sum(lens)
    for dtype in dtypes_for(device):
        for hq, hkv, D in [(6, 2, 64), (4, 4, 128), (3, 1, 24)]:
            q = torch.randn(T, hq, D, generator=gen).to(device, dtype)
            k = torch.randn(T, hkv, D, generator=gen).to(device, dtype)
            v = torch.randn(T, hkv, D, generator=gen).to(device, dtype)
            out = kv.prefill_attention(q, k, v, cu.to(device), D ** -0.5)
            for b in range(len(lens)):
                a, e = int(cu[b]), int(cu[b + 1])
                if e == a:
                    continue
                want = F.scaled_dot_product_attention(
                    q[a:e].float().transpose(0, 1), k[a:e].float().transpose(0, 1),
                    v[a:e].float().transpose(0, 1), is_causal=True, scale=D ** -0.5,
                    enable_gqa=True).transpose(0, 1)
                torch.testing.assert_close(out[a:e].float(), want, **TOL[dtype])


@pytest.mark.parametrize("hq,hkv,D", [(9, 3, 64), (12, 2, 128), (4, 4, 40), (18, 1, 32)])
def test_blocked_prefill_matches_the_reference_and_the_per_token_kernel(monkeypatch, hq, hkv, D):
    """The CPU prefill in blocks of tokens (the cascade's prefix item over the keys a block's
    tokens share, the per-token kernel over the causal diagonal, merged): long prompts with ragged
    last blocks, one behind cached prefix keys, GQA ratios 1 to 18 (past a work item's 16 heads),
    fp32 and bf16; against the reference and against GRPO_FAST_NO_BLOCKED_PREFILL=1 (per token)."""
    if not has_native("prefill_attention", "cpu"):
        pytest.skip("no native CPU prefill kernel (a build without the C++ extension)")
    gen = torch.Generator().manual_seed(hq + D)
    nq, nk = [211, 3, 130], [211, 70, 190]  # the last two: 67 and 60 cached keys in front
    cu_q = torch.tensor([0] + torch.tensor(nq).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(nk).cumsum(0).tolist(), dtype=torch.int32)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(sum(nq), hq, D, generator=gen).to(dtype)
        k, v = (torch.randn(sum(nk), hkv, D, generator=gen).to(dtype) for _ in range(2))
        out = kv.prefill_attention(q, k, v, cu_q, D ** -0.5, cu_seqlens_k=cu_k)
        want = ref.prefill_attention(q.float(), k.float(), v.float(), cu_q, D ** -0.5, cu_k)
        torch.testing.assert_close(out.float(), want, **TOL[dtype])
        monkeypatch.setenv("GRPO_FAST_NO_BLOCKED_PREFILL", "1")
        per_token = kv.prefill_attention(q, k, v, cu_q, D ** -0.5, cu_seqlens_k=cu_k)
        monkeypatch.delenv("GRPO_FAST_NO_BLOCKED_PREFILL")
        torch.testing.assert_close(out.float(), per_token.float(), **TOL[dtype])
        assert not torch.equal(out, per_token)  # the blocked path ran (another order of fp32 sums)


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_attention_with_cached_prefix_keys(device):
    """More keys than queries (a cached prefix in front): bottom-right causal alignment."""
    gen = torch.Generator().manual_seed(3)
    nq, nk = [3, 16], [19, 16]
    cu_q = torch.tensor([0, 3, 19], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 19, 35], dtype=torch.int32, device=device)
    q = torch.randn(19, 4, 64, generator=gen).to(device)
    k = torch.randn(35, 2, 64, generator=gen).to(device)
    v = torch.randn(35, 2, 64, generator=gen).to(device)
    out = kv.prefill_attention(q, k, v, cu_q, 0.125, cu_seqlens_k=cu_k)
    want = ref.prefill_attention(q, k, v, cu_q, 0.125, cu_k)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    # the last query of sequence 0 sees all 19 keys: plain softmax attention over them
    full = F.scaled_dot_product_attention(q[2:3].transpose(0, 1), k[:19].transpose(0, 1),
                                          v[:19].transpose(0, 1), scale=0.125, enable_gqa=True)
    torch.testing.assert_close(out[2], full.transpose(0, 1)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_append_kv_and_copy_blocks_match_reference(device):
    gen = torch.Generator().manual_seed(4)
    for dtype in dtypes_for(device):
        kc = torch.randn(8, 4, 2, 8, generator=gen).to(device, dtype)
        vc = torch.randn(8, 4, 2, 8, generator=gen).to(device, dtype)
        k = torch.randn(5, 2, 8, generator=gen).to(device, dtype)
        v = torch.randn(5, 2, 8, generator=gen).to(device, dtype)
        slots = torch.tensor([3, -1, 31, 0, 17], dtype=torch.int32, device=device)
        kc2, vc2 = kc.clone(), vc.clone()
        kv.append_kv(kc, vc, k, v, slots)
        ref.append_kv(kc2, vc2, k, v, slots)
        assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
        mapping = torch.tensor([[0, 5], [7, 1], [0, 2]], device=device)
        kv.copy_blocks(kc, vc, mapping)
        ref.copy_blocks(kc2, vc2, mapping)
        assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
        assert torch.equal(kc[5], kc[0]) and torch.equal(vc[1], vc[7])
        kv.copy_blocks(kc, vc, [])  # nothing to copy is fine


def test_ops_trace_under_torch_compile():
    gen = torch.Generator().manual_seed(5)
    kc, vc, tables, cl = random_paged(3, [5, 20, 33], 2, 64, 16, torch.float32, "cpu", gen)
    q = torch.randn(3, 4, 64, generator=gen)
    slots = torch.tensor([1, 2, 3], dtype=torch.int32)
    nk = torch.randn(3, 2, 64, generator=gen)

    def step(q, nk):
        kv.append_kv(kc, vc, nk, nk, slots)
        return kv.paged_decode_attention(q, kc, vc, tables, cl, 0.125)

    want = step(q, nk)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(q, nk)
    torch.testing.assert_close(got, want)
    import grpo_fast.sampler.sampling_op  # noqa: F401  (registers grpo_fast::sample; run alone, nothing else has)

    for op in ("append_kv", "copy_blocks", "paged_decode_attention", "prefill_attention", "sample"):
        assert hasattr(torch.ops.grpo_fast, op)


def test_validation_errors_name_the_argument():
    kc = torch.zeros(4, 16, 2, 64)
    vc = torch.zeros(4, 16, 2, 64)
    q = torch.zeros(2, 4, 64)
    bt = torch.zeros(2, 4, dtype=torch.int32)
    cl = torch.ones(2, dtype=torch.int32)
    cases = [
        (dict(query=q[:, :, :32]), "query"),
        (dict(query=torch.zeros(2, 4, 64, dtype=torch.float64)), "query"),
        (dict(query=torch.zeros(2, 3, 64)), "multiple"),
        (dict(key_cache=kc.transpose(1, 2)), "key_cache"),
        (dict(value_cache=torch.zeros(4, 16, 1, 64)), "value_cache"),
        (dict(block_tables=bt.long()), "block_tables"),
        (dict(block_tables=torch.zeros(3, 4, dtype=torch.int32)), "block_tables"),
        (dict(context_lens=torch.ones(3, dtype=torch.int32)), "context_lens"),
        (dict(context_lens=torch.full((2,), 65, dtype=torch.int32)), "context_lens"),
        (dict(scale=-1.0), "scale"),
        (dict(query=torch.zeros(4, 64)), "query"),
    ]
    base = dict(query=q, key_cache=kc, value_cache=vc, block_tables=bt, context_lens=cl, scale=1.0)
    for change, name in cases:
        with pytest.raises(ValueError, match=name):
            kv.paged_decode_attention(**{**base, **change})
    with pytest.raises(ValueError, match="block_tables"):  # a block id outside the cache
        kv.paged_decode_attention(q, kc, vc, torch.full((2, 4), 9, dtype=torch.int32), cl, 1.0)
    with pytest.raises(ValueError, match="float16"):
        kv.paged_decode_attention(q.half(), kc.half(), vc.half(), bt, cl, 1.0)
    k = torch.zeros(3, 2, 64)
    with pytest.raises(ValueError, match="slot_mapping"):
        kv.append_kv(kc, vc, k, k, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="slot_mapping"):
        kv.append_kv(kc, vc, k, k, torch.tensor([0, 1, 64], dtype=torch.int32))
    with pytest.raises(ValueError, match="value"):
        kv.append_kv(kc, vc, k, torch.zeros(2, 2, 64), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="block_mapping"):
        kv.copy_blocks(kc, vc, torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match="block_mapping"):
        kv.copy_blocks(kc, vc, torch.tensor([0, 1]))
    qp = torch.zeros(5, 4, 64)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens"):
        kv.prefill_attention(qp, qp[:, :2].contiguous(), qp[:, :2].contiguous(), torch.tensor([0, 2, 4], dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        kv.prefill_attention(qp, qp[:4, :2].contiguous(), qp[:4, :2].contiguous(), cu, 1.0,
                             cu_seqlens_k=torch.tensor([0, 1, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="key"):
        kv.prefill_attention(qp, qp[:, :3].contiguous(), qp[:, :3].contiguous(), cu, 1.0)



def test_prefix_cache_hit_prefill_equals_full_prefill():
    """Second prompt sharing a cached system prefix: gather the cached K/V, attend with
    cu_seqlens_k; equals causal attention over the whole prompt computed from scratch."""
    gen = torch.Generator().manual_seed(6)
    bs, hkv, hq, D = 4, 2, 4, 64
    bm = kv.BlockManager(16, bs)
    kc = torch.zeros(16, bs, hkv, D)
    vc = torch.zeros_like(kc)
    system = [9] * 8
    # K/V are a deterministic function of (position, token) in this toy "model"
    table = torch.randn(64, 64, hkv, D, generator=gen)

    def kv_of(tokens, start=0):
        return torch.stack([table[start + i, t] for i, t in enumerate(tokens)])

    a = system + [1, 2, 3]
    assert bm.allocate(0, a) == 0
    kv.append_kv(kc, vc, kv_of(a), kv_of(a) * 2, bm.slot_mapping(0))
    b = system + [4, 5]
    cached = bm.allocate(1, b)
    assert cached == 8
    new_k, new_v = kv_of(b[cached:], cached), kv_of(b[cached:], cached) * 2
    pk, pv = kv.gather_kv(kc, vc, bm.slot_mapping(1, 0, cached))
    q = torch.randn(len(b) - cached, hq, D, generator=gen)
    out = kv.prefill_attention(
        q, torch.cat([pk, new_k]), torch.cat([pv, new_v]),
        torch.tensor([0, len(b) - cached], dtype=torch.int32), 0.125,
        cu_seqlens_k=torch.tensor([0, len(b)], dtype=torch.int32))
    full_q = torch.cat([torch.zeros(cached, hq, D), q])  # rows before `cached` are not needed
    want = ref.prefill_attention(full_q, kv_of(b), kv_of(b) * 2,
                                 torch.tensor([0, len(b)], dtype=torch.int32), 0.125)[cached:]
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


_BASELINE_CHECK = """
import torch
from grpo_fast import kv
from grpo_fast.kv import reference as ref
g = torch.Generator().manual_seed(0)
for D in (64, 128, 40):
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-2)):
        kc = torch.randn(12, 16, 2, D, generator=g).to(dtype)
        vc = torch.randn(12, 16, 2, D, generator=g).to(dtype)
        tables = torch.randperm(12, generator=g).int().view(3, 4).contiguous()
        lens = torch.tensor([1, 17, 64], dtype=torch.int32)
        q = torch.randn(3, 6, D, generator=g).to(dtype)
        out = kv.paged_decode_attention(q, kc, vc, tables, lens, 0.1)
        want = ref.paged_decode_attention(q, kc, vc, tables, lens, 0.1)
        torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)
        k, v = kc.view(-1, 2, D)[:30].contiguous(), vc.view(-1, 2, D)[:30].contiguous()
        cu = torch.tensor([0, 13, 30], dtype=torch.int32)
        qp = torch.randn(30, 6, D, generator=g).to(dtype)
        torch.testing.assert_close(kv.prefill_attention(qp, k, v, cu, 0.1).float(),
                                   ref.prefill_attention(qp, k, v, cu, 0.1).float(),
                                   atol=tol, rtol=tol)
print("ok")
"""


def test_baseline_x86_kernels_match_reference():
    """The non-AVX2 build of the CPU attention (what a machine without AVX2 runs)."""
    assert run_fresh(_BASELINE_CHECK, env={"GRPO_FAST_NO_AVX2": "1"}) == "ok"


@pytest.mark.parametrize("device", DEVICES)
def test_decode_step_equals_the_public_ops(device):
    """kv.decode_step.DecodeStep (metadata validated once, kernels called directly) writes the
    same cache rows and returns the same attention as append_kv + paged_decode_attention, over
    two layers' caches, and names the argument it rejects."""
    from grpo_fast.kv.decode_step import DecodeStep

    gen = torch.Generator().manual_seed(7)
    lens = [5, 17, 33]
    for dtype in dtypes_for(device):
        kc, vc, tables, cl = random_paged(3, lens, 2, 64, 16, dtype, device, gen)
        slots = torch.stack([tables[s, (n - 1) // 16] * 16 + (n - 1) % 16 for s, n in enumerate(lens)]).int()
        layers = [(kc.clone(), vc.clone()), (kc.clone(), vc.clone())]
        want_caches = [(kc.clone(), vc.clone()), (kc.clone(), vc.clone())]
        step = DecodeStep(slots, tables, cl, 0.125, layers[0][0], num_q_heads=6)
        for (k_c, v_c), (wk, wv) in zip(layers, want_caches):
            k, v = (torch.randn(3, 2, 64, generator=gen).to(device, dtype) for _ in range(2))
            q = torch.randn(3, 6, 64, generator=gen).to(device, dtype)
            step.append(k_c, v_c, k, v)
            kv.append_kv(wk, wv, k, v, slots)
            assert torch.equal(k_c, wk) and torch.equal(v_c, wv)
            torch.testing.assert_close(step.attend(q, k_c, v_c), kv.paged_decode_attention(q, wk, wv, tables, cl, 0.125),
                                       atol=0, rtol=0)
        with pytest.raises(ValueError, match=r"query: need a contiguous .*\[3, 6, 64\]"):
            step.attend(torch.zeros(3, 4, 64, dtype=dtype, device=device), *layers[0])
        with pytest.raises(ValueError, match="key_cache: need a contiguous"):
            step.append(kc[:-1].clone(), vc[:-1].clone(), k, v)
        with pytest.raises(ValueError, match="not a multiple"):
            DecodeStep(slots, tables, cl, 0.125, kc, num_q_heads=5)
        if device == "cpu":  # a host-side bound check (on CUDA it would sync the stream)
            with pytest.raises(ValueError, match="context_lens"):
                DecodeStep(slots, tables, torch.tensor([5, 17, 999], dtype=torch.int32), 0.125, kc, 6)
