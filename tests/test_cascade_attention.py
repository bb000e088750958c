"""Cascade decode attention (kv.cascade_decode_attention, kv.cascade.cascade_groups): the G
sequences of a group attend their shared prompt once, as one block of queries, and merge it
exactly with their own keys. Checked against the per-sequence paged kernel and the SDPA
reference, on the block layout the sampler's BlockManager really produces (forked groups,
copy-on-write of the partial prompt block, decoded tokens), with GQA ratios, prefixes that cross
blocks or end inside one, bf16 / fp32, head dims on and off the AVX2 path; on CUDA (gpu marker)
against the CPU kernel, the oracle.

Tolerances: the cascade sums the same terms as the paged kernel in another order and merges two
softmax states, so fp32 agrees to ~1e-6; bf16 outputs are rounded once from fp32 like the paged
kernel's, so they differ by at most one bf16 rounding.
"""
import numpy as np
import pytest
import torch

from grpo_fast import kv
from grpo_fast.kv import reference as ref
from grpo_fast.native import has_native

TOL = {torch.float32: dict(atol=3e-6, rtol=3e-6), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


def grpo_layout(prompts, G, C, hkv, D, dtype, bs=16, seed=0, device="cpu", extra_lone=0):
    """Caches and decode metadata of len(prompts) groups of G sequences forked from prompts of
    the given lengths, after C decoded tokens (plus `extra_lone` unrelated single sequences);
    rows interleaved across groups so a group's rows are not contiguous."""
    gen = torch.Generator().manual_seed(seed)
    per = -(-(max(prompts) + C + 1) // bs)
    bm = kv.BlockManager((len(prompts) * G + extra_lone) * per + len(prompts) + 4, bs, enable_prefix_cache=False)
    ids, group_of = [], {}
    for b, P in enumerate(prompts):
        bm.allocate(-1 - b, [3 + b * 7919 + i for i in range(P)])
        kids = [1000 * b + g for g in range(G)]
        bm.fork(-1 - b, kids)
        bm.free(-1 - b)
        for k in kids:
            group_of[k] = b
    for j in range(extra_lone):
        bm.allocate(50_000 + j, list(range(5 + j)))
        group_of[50_000 + j] = 100 + j
    order = sorted(group_of, key=lambda k: (k % 1000, k))  # interleave the groups' rows
    for _ in range(C + 1):
        for sid in order:
            bm.append_token(sid)
    _, tables, lens = bm.decode_metadata(order)
    kc = torch.randn(bm.num_blocks, bs, hkv, D, generator=gen).to(device, dtype)
    vc = torch.randn(bm.num_blocks, bs, hkv, D, generator=gen).to(device, dtype)
    return kc, vc, tables, lens, [group_of[s] for s in order]


def run_both(q, kc, vc, tables, lens, groups, scale):
    dev = q.device
    rows, starts, prefix = (torch.as_tensor(a).to(dev) for a in groups)
    tables, lens = tables.to(dev), lens.to(dev)
    out = kv.cascade_decode_attention(q, kc, vc, tables, lens, scale, rows, starts, prefix)
    paged = kv.paged_decode_attention(q, kc, vc, tables, lens, scale)
    return out, paged, (tables, lens, rows, starts, prefix)


def test_native_cascade_is_built():
    assert has_native("cascade_decode_attention", "cpu")


@pytest.mark.parametrize("hq,hkv", [(9, 3), (12, 2), (4, 4), (40, 2)])
@pytest.mark.parametrize("D", [64, 128, 40, 36])
def test_cascade_equals_paged_and_sdpa(hq, hkv, D):
    """Prefixes of 8 (inside one block), 37 (crossing blocks, ending mid-block), 300 (past a
    256-key work split) tokens, a lone sequence; rep = 1, 3, 6 and 20 (> the 16 query heads of
    one CPU work item); D = 40 ends the AVX2 P.V in an 8-wide panel after a 32-wide one; D = 36
    takes the scalar prefix path."""
    for dtype in (torch.float32, torch.bfloat16):
        kc, vc, tables, lens, gids = grpo_layout([8, 37, 300], G=3, C=5, hkv=hkv, D=D, dtype=dtype,
                                                 seed=hq + D, extra_lone=1)
        groups = kv.cascade_groups(tables, lens, gids, 16, min_prefix=1)
        assert groups is not None and list(groups.prefix) == [0, 32, 288, 0]  # full shared blocks only
        q = torch.randn(len(gids), hq, D, generator=torch.Generator().manual_seed(5)).to(dtype)
        out, paged, _ = run_both(q, kc, vc, tables, lens, groups, D ** -0.5)
        want = ref.paged_decode_attention(q, kc, vc, tables, lens, D ** -0.5)
        torch.testing.assert_close(out.float(), paged.float(), **TOL[dtype])
        torch.testing.assert_close(out.float(), want.float(), **TOL[dtype])
        explicit = ref.cascade_decode_attention(q, kc, vc, tables, lens, D ** -0.5,
                                                *(torch.as_tensor(a) for a in groups))
        torch.testing.assert_close(explicit.float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("bs,prompts,prefix", [(16, [20, 50], [16, 48]), (4, [14, 45, 7], [12, 44, 4])])
def test_prefix_chunks_shorter_than_a_micro_tile(bs, prompts, prefix):
    """The AVX2 prefix item packs keys 8 at a time and softmaxes 32 at a time: a last chunk of
    16 keys (masked lanes), of 12 (8 packed + 4 one by one) or of 4 must weigh only its keys."""
    for dtype in (torch.float32, torch.bfloat16):
        kc, vc, tables, lens, gids = grpo_layout(prompts, G=4, C=3, hkv=3, D=64, dtype=dtype, bs=bs, seed=bs)
        groups = kv.cascade_groups(tables, lens, gids, bs, min_prefix=1)
        assert list(groups.prefix) == prefix
        q = torch.randn(len(gids), 9, 64, generator=torch.Generator().manual_seed(2)).to(dtype) * 4  # peaked
        out, paged, _ = run_both(q, kc, vc, tables, lens, groups, 64 ** -0.5)
        torch.testing.assert_close(out.float(), paged.float(), **TOL[dtype])
        want = ref.paged_decode_attention(q, kc, vc, tables, lens, 64 ** -0.5)
        torch.testing.assert_close(out.float(), want.float(), **TOL[dtype])


def test_prefix_ending_inside_a_shared_block():
    """A prefix length that is not a multiple of the block size (any length whose blocks the
    group shares is allowed by the contract), and every grouping of the same rows."""
    kc, vc, tables, lens, gids = grpo_layout([70], G=5, C=3, hkv=2, D=64, dtype=torch.float32)
    q = torch.randn(5, 6, 64, generator=torch.Generator().manual_seed(2))
    want = kv.paged_decode_attention(q, kc, vc, tables, lens, 0.125)
    for prefix in (1, 15, 17, 33, 63, 64):
        rows = torch.tensor([4, 0, 2, 1, 3], dtype=torch.int32)
        starts = torch.tensor([0, 5], dtype=torch.int32)
        out = kv.cascade_decode_attention(q, kc, vc, tables, lens, 0.125, rows, starts,
                                          torch.tensor([prefix], dtype=torch.int32))
        torch.testing.assert_close(out, want, **TOL[torch.float32])
    # two groups of the same prompt's rows, and all rows alone
    for starts, prefix in (([0, 2, 5], [64, 48]), ([0, 1, 2, 3, 4, 5], [0, 64, 0, 16, 0])):
        out = kv.cascade_decode_attention(q, kc, vc, tables, lens, 0.125, torch.arange(5, dtype=torch.int32),
                                          torch.tensor(starts, dtype=torch.int32),
                                          torch.tensor(prefix, dtype=torch.int32))
        torch.testing.assert_close(out, want, **TOL[torch.float32])


def test_cascade_groups_reads_what_is_shared():
    """Only physically shared leading blocks count: a group whose sequence was preempted and
    recomputed (its own blocks) shares nothing with it; below min_prefix a group is attended per
    sequence; with no group left, None (the plain paged kernel runs)."""
    tables = np.array([[7, 8, 9, 40], [7, 8, 9, 41], [7, 8, 30, 31], [5, 6, 50, -1], [60, 61, 62, -1]], np.int32)
    lens = np.array([60, 60, 60, 40, 40], np.int32)
    g = kv.cascade_groups(tables, lens, [0, 0, 0, 1, 1], 16, min_prefix=16)
    assert list(g.rows) == [0, 1, 2, 3, 4] and list(g.starts) == [0, 3, 5] and list(g.prefix) == [32, 0]
    assert kv.cascade_groups(tables, lens, [0, 0, 0, 1, 1], 16, min_prefix=33) is None
    assert kv.cascade_groups(tables, lens, [0, 1, 2, 3, 4], 16, min_prefix=1) is None  # all alone
    g = kv.cascade_groups(tables, np.array([20, 60, 60, 40, 40], np.int32), [0, 0, 0, 1, 1], 16, min_prefix=1)
    assert list(g.prefix) == [20, 0]  # capped by the shortest context


def test_validation_names_the_problem():
    kc, vc, tables, lens, gids = grpo_layout([40, 40], G=2, C=1, hkv=1, D=64, dtype=torch.float32)
    q = torch.randn(4, 2, 64)
    rows = torch.tensor([0, 2, 1, 3], dtype=torch.int32)  # rows interleaved: 0, 2 are group 0
    starts = torch.tensor([0, 2, 4], dtype=torch.int32)

    def call(rows=rows, starts=starts, prefix=(32, 32)):
        return kv.cascade_decode_attention(q, kc, vc, tables, lens, 0.1, rows, starts,
                                           torch.tensor(prefix, dtype=torch.int32))

    call()
    with pytest.raises(ValueError, match="does not share the prefix"):
        call(rows=torch.tensor([0, 1, 2, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="permutation"):
        call(rows=torch.tensor([0, 0, 1, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="group_starts"):
        call(starts=torch.tensor([0, 2, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="exceeds the context"):
        call(prefix=(64, 32))
    with pytest.raises(ValueError, match="group_rows: need"):
        call(rows=rows[:3].contiguous())


def test_decode_step_runs_the_cascade():
    """DecodeStep with groups gives the paged result; the sampler's runner builds the groups."""
    from grpo_fast.kv.decode_step import DecodeStep

    kc, vc, tables, lens, gids = grpo_layout([100, 64], G=4, C=2, hkv=3, D=64, dtype=torch.float32)
    groups = kv.cascade_groups(tables, lens, gids, 16, min_prefix=16)
    slots = torch.zeros(len(gids), dtype=torch.int32) - 1
    q = torch.randn(len(gids), 9, 64, generator=torch.Generator().manual_seed(0))
    step = DecodeStep(slots, tables, lens, 0.125, kc, 9, groups)
    plain = DecodeStep(slots, tables, lens, 0.125, kc, 9)
    torch.testing.assert_close(step.attend(q, kc, vc), plain.attend(q, kc, vc), **TOL[torch.float32])


def bf16_cascade_cases():
    """(output, float64 reference, float64 sum_j p_j |v_j|) triples in bf16, of the cascade and
    (first three shapes) of the per-sequence paged kernel: groups of 8 with prefixes inside one
    block, across blocks and past a 256-key work split (rep 3, 6 and 20: 24, 48 and 160 queries
    a group, i.e. 3, 6 and 20 vectors of 8); then prefix lengths that leave the last key of a
    step without a partner (1, 15, 17, 33, 63 of a 70-token prompt shared 5 ways)."""
    cases = []
    for hq, hkv, D in ((9, 3, 64), (12, 2, 128), (40, 2, 64)):
        kc, vc, tables, lens, gids = grpo_layout([37, 300, 531], G=8, C=5, hkv=hkv, D=D, dtype=torch.bfloat16,
                                                 seed=hq + D, extra_lone=1)
        groups = [torch.as_tensor(a) for a in kv.cascade_groups(tables, lens, gids, 16, min_prefix=1)]
        q = (torch.randn(len(gids), hq, D, generator=torch.Generator().manual_seed(D)) * 3).to(torch.bfloat16)
        out = kv.cascade_decode_attention(q, kc, vc, tables, lens, D ** -0.5, *groups)
        want = _reference_and_weighted_abs(q, kc, vc, tables, lens, D ** -0.5)
        cases.append((out, *want))
        # the per-sequence kernel too: its scores of whole 8-key steps on vdpbf16ps
        cases.append((kv.paged_decode_attention(q, kc, vc, tables, lens, D ** -0.5), *want))
    kc, vc, tables, lens, gids = grpo_layout([70], G=5, C=3, hkv=2, D=64, dtype=torch.bfloat16)
    q = torch.randn(5, 6, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    want = _reference_and_weighted_abs(q, kc, vc, tables, lens, 0.125)
    for prefix in (1, 15, 17, 33, 63):
        out = kv.cascade_decode_attention(q, kc, vc, tables, lens, 0.125, torch.tensor([4, 0, 2, 1, 3], dtype=torch.int32),
                                          torch.tensor([0, 5], dtype=torch.int32), torch.tensor([prefix], dtype=torch.int32))
        cases.append((out, *want))
    return cases


def _reference_and_weighted_abs(q, kc, vc, tables, lens, scale):
    """The float64 reference output, and the same weights over |v| (the scale of what rounding
    each weight to bf16 can move)."""
    q, kc, vc = q.double(), kc.double(), vc.double()
    return (ref.paged_decode_attention(q, kc, vc, tables, lens, scale),
            ref.paged_decode_attention(q, kc, vc.abs(), tables, lens, scale))


def bf16_step(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |x| (8 significant bits)."""
    return 2.0 ** (torch.floor(torch.log2(x.double().abs().clamp_min(1e-30))) - 7)


_AVX2_PREFIX_OUTPUTS = """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from grpo_fast import _C
    from test_cascade_attention import bf16_cascade_cases
    assert not _C.cpu_cascade_bf16_dot_products()
    torch.save([case[0] for case in bf16_cascade_cases()], {path!r})
    print("ok")
"""


def _dot_products_run() -> bool:
    from grpo_fast.native import _C

    return has_native("cascade_decode_attention", "cpu") and bool(_C.cpu_cascade_bf16_dot_products())


@pytest.mark.skipif(not _dot_products_run(), reason="this CPU has no AVX512-BF16 (or GRPO_FAST_NO_AVX512_BF16=1 "
                    "is set): its bf16 cascade runs the AVX2 prefix item, which the tests above cover")
def test_bf16_prefix_on_dot_product_instructions(tmp_path):
    """The AVX512-BF16 prefix item (vdpbf16ps; its weights rounded to bf16 for P.V, its own exp)
    and the per-sequence kernel's vdpbf16ps scores, against the AVX2 kernels (fp32 weights and
    scores from fp32 copies), run in a fresh process with GRPO_FAST_NO_AVX512_BF16=1:
    every output within one bf16 step (of the output) plus 2^-9 sum_j p_j |v_j| (the most that
    rounding each weight to bf16 moves it) of the AVX2 output and of the float64 reference, and
    not all equal to the AVX2 output (so this kernel ran)."""
    from pathlib import Path

    from fresh_process import run_fresh

    path = tmp_path / "avx2.pt"
    code = _AVX2_PREFIX_OUTPUTS.format(tests=str(Path(__file__).parent), path=str(path))
    assert run_fresh(code, env={"GRPO_FAST_NO_AVX512_BF16": "1"}) == "ok"
    differ = 0
    for (out, want, weighted_abs), avx2 in zip(bf16_cascade_cases(), torch.load(path), strict=True):
        out, avx2 = out.double(), avx2.double()
        weights = 2.0 ** -9 * weighted_abs
        assert ((out - avx2).abs() <= bf16_step(torch.maximum(out.abs(), avx2.abs())) + weights).all()
        assert ((out - want).abs() <= bf16_step(torch.maximum(out.abs(), want.abs())) + weights).all()
        differ += int((out != avx2).sum())
    assert differ > 0


def test_the_sampler_threshold_follows_the_bf16_kernel():
    """A bf16 cache takes the cascade from CPU_MIN_PREFIX_BF16_DOT shared tokens where the
    AVX512-BF16 prefix item runs (measured there), CPU_MIN_PREFIX otherwise; fp32 from
    CPU_MIN_PREFIX_AVX512 where the prefix tiles run on zmm, else CPU_MIN_PREFIX. The switches
    that turn those kernels off restore CPU_MIN_PREFIX."""
    from fresh_process import run_fresh

    from grpo_fast.kv.cascade import CPU_MIN_PREFIX, CPU_MIN_PREFIX_AVX512, CPU_MIN_PREFIX_BF16_DOT
    from grpo_fast.sampler.model_runner import default_cascade_min_prefix

    cpu = torch.device("cpu")
    want = CPU_MIN_PREFIX_BF16_DOT if _dot_products_run() else CPU_MIN_PREFIX
    assert default_cascade_min_prefix(cpu, torch.bfloat16) == want
    want32 = CPU_MIN_PREFIX_AVX512 if _avx512_runs() else CPU_MIN_PREFIX  # fp32: the prefix tiles on zmm
    assert default_cascade_min_prefix(cpu, torch.float32) == default_cascade_min_prefix(cpu) == want32
    off = run_fresh("""
        import torch
        from grpo_fast.sampler.model_runner import default_cascade_min_prefix
        print(default_cascade_min_prefix(torch.device("cpu"), torch.bfloat16),
              default_cascade_min_prefix(torch.device("cpu"), torch.float32))
    """, env={"GRPO_FAST_NO_AVX512_BF16": "1", "GRPO_FAST_NO_AVX512": "1"})
    assert off == f"{CPU_MIN_PREFIX} {CPU_MIN_PREFIX}"


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,D", [(9, 3, 64), (12, 2, 128), (8, 8, 64), (14, 2, 96)])
def test_cuda_cascade_equals_the_cpu_oracle(hq, hkv, D):
    """The CUDA kernel against the CPU one (the oracle) and the CUDA paged kernel: groups of 8 and
    16 (more queries than one block takes), prefixes crossing its 128-key splits."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for G, prompts in ((8, [200, 37, 5]), (16, [300, 129])):
            kc, vc, tables, lens, gids = grpo_layout(prompts, G=G, C=4, hkv=hkv, D=D,
                                                     dtype=torch.float32, seed=hq * D + G)
            groups = kv.cascade_groups(tables, lens, gids, 16, min_prefix=1)
            q = torch.randn(len(gids), hq, D, generator=torch.Generator().manual_seed(G))
            q, kc, vc = q.to(dtype), kc.to(dtype), vc.to(dtype)  # the inputs both devices see
            cdtype = torch.float32 if dtype == torch.float16 else dtype  # the CPU kernel: fp32 / bf16
            want = kv.cascade_decode_attention(q.to(cdtype), kc.to(cdtype), vc.to(cdtype), tables, lens, D ** -0.5,
                                               *(torch.as_tensor(a) for a in groups))
            out, paged, _ = run_both(q.cuda(), kc.cuda(), vc.cuda(), tables, lens, groups, D ** -0.5)
            torch.testing.assert_close(out.float().cpu(), want.float(), **TOL[dtype])
            torch.testing.assert_close(out.float(), paged.float(), **TOL[dtype])


@pytest.mark.parametrize("path", ["native", "modules"])
def test_sampler_takes_the_cascade_and_equals_hf(path, monkeypatch):
    """Prompts of 140-170 tokens, each forked 4 ways (block_size 4): every group shares >= 128
    tokens (at least kv.cascade.cpu_min_prefix's threshold for fp32), so each decode step attends them as a cascade, on the
    native stack and on the per-module path; greedy tokens and log-probs equal HF's, and equal
    the sampler's with cascade=False to fp32 rounding."""
    from test_sampler import assert_matches_hf, random_prompts, tiny_model

    from grpo_fast.models import cpu_ops, native_decode
    from grpo_fast.sampler import Sampler, SamplingParams, model_runner

    if path == "native" and not cpu_ops.available():
        pytest.skip("native CPU kernels need AVX2+FMA")
    if path == "modules":
        monkeypatch.setenv("GRPO_FAST_NO_NATIVE_LAYER", "1")
    built, native_calls = [], []
    real_groups, real_native = model_runner.cascade_groups, native_decode.decode_forward
    monkeypatch.setattr(model_runner, "cascade_groups", lambda *a, **k: built.append(real_groups(*a, **k)) or built[-1])
    monkeypatch.setattr(native_decode, "decode_forward", lambda *a: native_calls.append(1) or real_native(*a))
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_model("qwen2", seed=2)
        prompts = random_prompts((140, 155, 170), seed=5)
        sampler = Sampler(model, None, block_size=4, kv_budget="2048 tokens")
        threshold = kv.cascade.cpu_min_prefix(torch.float32)  # 128, or 64 on AVX-512
        assert sampler.runner.cascade_min_prefix == threshold
        outs = assert_matches_hf(model, sampler, prompts, n=4, max_tokens=8)
        assert built and all(g is not None and (g.prefix >= threshold).all() for g in built), \
            "no cascade taken"
        assert bool(native_calls) == (path == "native")
        plain = Sampler(model, None, block_size=4, kv_budget="2048 tokens", cascade=False)
        params = SamplingParams(n=4, temperature=0.0, max_tokens=8)
        for a, b in zip(outs, plain.generate(prompts, params)):
            for ca, cb in zip(a.completions, b.completions):
                assert ca.token_ids == cb.token_ids
                torch.testing.assert_close(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=1e-5, rtol=0)
    finally:
        torch.set_num_threads(old)


def _avx512_runs() -> bool:
    from grpo_fast.native import _C

    return has_native("cascade_decode_attention", "cpu") and bool(getattr(_C, "cpu_avx512", lambda: False)())


_WIDE_TILE_CASES = """
    import torch
    from grpo_fast import kv
    from test_cascade_attention import grpo_layout
    outs = []
    for dtype in (torch.float32, torch.bfloat16):
        for hq, hkv, D, prompts in ((9, 3, 64, [37, 300]), (12, 2, 128, [531]), (7, 7, 40, [90]), (6, 1, 24, [70])):
            kc, vc, tables, lens, gids = grpo_layout(prompts, G=5, C=4, hkv=hkv, D=D, dtype=dtype, seed=hq + D,
                                                     extra_lone=1)
            groups = [torch.as_tensor(a) for a in kv.cascade_groups(tables, lens, gids, 16, min_prefix=1)]
            q = torch.randn(len(gids), hq, D, generator=torch.Generator().manual_seed(D)).to(dtype)
            outs.append(kv.cascade_decode_attention(q, kc, vc, tables, lens, D ** -0.5, *groups))
            outs.append(kv.paged_decode_attention(q, kc, vc, tables, lens, D ** -0.5))  # its P.V panels too
            # the blocked prefill (the same prefix item over a prompt's own keys)
            gen = torch.Generator().manual_seed(hq)
            cu = torch.tensor([0, 150, 150 + 97], dtype=torch.int32)
            qp = torch.randn(247, hq, D, generator=gen).to(dtype)
            kp, vp = (torch.randn(247, hkv, D, generator=gen).to(dtype) for _ in range(2))
            outs.append(kv.prefill_attention(qp, kp, vp, cu, D ** -0.5))
    torch.save(outs, {path!r})
    print("ok")
"""


@pytest.mark.skipif(not _avx512_runs(), reason="this CPU has no AVX-512 F (or GRPO_FAST_NO_AVX512=1 is set)")
def test_prefix_item_on_zmm_tiles_equals_the_ymm_one_bit_for_bit(tmp_path):
    """The fp32 prefix item's score and P.V tiles on zmm (6 queries x 32 keys / dims, where the
    CPU has AVX-512), and the per-sequence kernel's fp32 P.V panels (16 dims a register), sum in
    the ymm code's order, so the cascade's and the paged kernel's outputs are theirs bit for bit:
    fp32 and bf16 caches (the bf16 one through the same item with the vdpbf16ps item off),
    query rows that are and are not a multiple of 6 (G x rep = 15, 30, 35, 30), D = 64, 128 and
    the ragged 40 and 24 (a last 8 dims on ymm), prefixes across work splits; and the blocked
    prefill, which runs the same prefix item over each prompt's own keys."""
    from pathlib import Path

    from fresh_process import run_fresh

    env = {"GRPO_FAST_NO_AVX512_BF16": "1", "PYTHONPATH": str(Path(__file__).parent)}
    paths = [tmp_path / "wide.pt", tmp_path / "ymm.pt"]
    assert run_fresh(_WIDE_TILE_CASES.format(path=str(paths[0])), env=env) == "ok"
    assert run_fresh(_WIDE_TILE_CASES.format(path=str(paths[1])), env={**env, "GRPO_FAST_NO_AVX512": "1"}) == "ok"
    wide, ymm = torch.load(paths[0]), torch.load(paths[1])
    assert len(wide) == len(ymm) == 24
    for a, b in zip(wide, ymm):
        assert torch.equal(a, b)
