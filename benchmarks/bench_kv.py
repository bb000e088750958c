"""KV-cache benchmark: (1) KV memory of B prompts x G completions under four storage schemes,
(2) CPU paged decode attention vs PyTorch gather + SDPA, (3) one decode step's block-manager
bookkeeping, C++ (kv.NativeBlockManager) vs its Python twin (kv.PyBlockManager).

(1) runs the real BlockManager through a GRPO generation (prefill, G completions per prompt,
finished sequences freed) and records blocks held:
  ours            prefill each prompt once, fork G children sharing every block, the partial
                  last one included (copy-on-write at its first divergence);
  full-block      vLLM-style prefix caching: each child allocated on its own, full prompt blocks
                  shared through the hash cache, the partial last block stored (and computed) G times;
  full-block-256  the same with 256-token blocks (nano-vllm's default);
  per-sequence    no sharing: every sequence stores its prompt.
(2) times one decode attention call over S sequences x L context tokens in shuffled blocks.
(3) forks S sequences from S/G prompts of P tokens (as the sampler does), then times each of
`steps` consecutive decode steps' bookkeeping: can_append + append_token for every sequence, then
one decode_metadata over all of them. Both managers replay the same operations, step by step
interleaved (the order alternating), and must return the same metadata.
(4) cascade vs per-sequence paged decode attention on a real GRPO layout: B prompts of P tokens
prefilled, forked into G sequences each (the real BlockManager), C tokens decoded, then one
decode attention call over the B x G sequences (SmolLM2's 9/3 heads x 64, and Qwen2.5-1.5B's
12/2 x 128), each kernel checked against the other and the two timed in alternation (bench_pair:
--repeats rounds of ~20 ms batches; the speed-up is the median of neighbouring batches' ratios,
which this VM's drift in speed does not move); then the
shortest prefix at which the cascade pays, fp32 and bf16 (the sampler's thresholds,
kv.cascade.CPU_MIN_PREFIX, CPU_MIN_PREFIX_AVX512 and CPU_MIN_PREFIX_BF16_DOT).

  python benchmarks/bench_kv.py            # full run, JSON to benchmarks/results/bench_kv.json
  python benchmarks/bench_kv.py --quick    # smaller shapes (smoke test)
  python benchmarks/bench_kv.py --only block_manager   # one section; JSON stamped by section
  python benchmarks/bench_kv.py --only cascade
  python benchmarks/bench_kv.py --only cascade --device cuda   # the CUDA kernels (GPU check stage)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from grpo_fast import kv
from grpo_fast.native import _C
from grpo_fast.kv.decode_step import DecodeStep

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_utils as bu  # noqa: E402

# SmolLM2-135M: 30 layers x 3 kv heads x head_dim 64, K and V, bf16
BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2


def simulate(scheme: str, B: int, G: int, P: int, lengths: list[list[int]], bs: int) -> dict:
    """Run one generation through a BlockManager; returns blocks after prefill, peak, and the
    number of prompt tokens whose KV had to be computed."""
    block_size = 256 if scheme == "full-block-256" else bs
    bm = kv.BlockManager(1 << 20, block_size, enable_prefix_cache=scheme != "per-sequence")
    computed = 0
    kids = {}
    for b in range(B):
        prompt = [1000 + b * 7919 + i for i in range(P)]  # distinct prompts
        if scheme == "ours":
            parent = -1 - b  # children get ids >= 0
            computed += P - bm.allocate(parent, prompt)
            bm.fork(parent, [b * G + g for g in range(G)])
            bm.free(parent)
        else:
            for g in range(G):
                computed += P - bm.allocate(b * G + g, prompt)
        for g in range(G):
            kids[b * G + g] = lengths[b][g]
    after_prefill = bm.num_blocks - bm.num_free_blocks
    peak = after_prefill
    step = 0
    while kids:
        for sid in list(kids):
            if kids[sid] == step:  # finished: blocks go back
                bm.free(sid)
                del kids[sid]
            else:
                bm.append_token(sid)
        peak = max(peak, bm.num_blocks - bm.num_free_blocks)
        step += 1
    return {"blocks_after_prefill": after_prefill, "peak_blocks": peak,
            "peak_tokens": peak * block_size, "prefill_tokens_computed": computed,
            "block_size": block_size}


def memory_section(B, G, P, C, bs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = (torch.randint(C // 4, C + 1, (B, G), generator=gen)).tolist()
    rows = {s: simulate(s, B, G, P, lengths, bs)
            for s in ("ours", "full-block", "full-block-256", "per-sequence")}
    # the target formula: group blocks at full length = sum ceil((P + C_i) / bs) minus the G - 1
    # shared copies of each full prompt block (the partial one is shared until divergence)
    full = [sum(-(-(P + c) // bs) for c in lengths[b]) - (G - 1) * (P // bs) for b in range(B)]
    after = B * -(-P // bs)
    assert rows["ours"]["blocks_after_prefill"] == after, (rows["ours"], after)
    assert rows["ours"]["peak_blocks"] <= sum(full)
    return {"B": B, "G": G, "P": P, "C_max": C, "block_size": bs, "completion_lengths": lengths,
            "target_blocks_all_running": sum(full), "schemes": rows}


def bench(fn, repeats, sync=None):
    """(median wall seconds, median process CPU seconds summed over threads) per call. CPU
    time is the fairer number on a shared machine: it does not count time spent descheduled.
    `sync` (CUDA: torch.cuda.synchronize) runs after each call, inside the timing."""
    sync = sync or (lambda: None)
    fn()
    sync()
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def bench_pair(fa, fb, repeats, batch_s=0.02):
    """Two kernels timed in alternation: each of `repeats` rounds runs a batch of calls of fa
    (~batch_s seconds), then the same number of fb. Per call: (median wall of fa, of fb, median
    CPU time of fa, of fb, median over rounds of wall(fa) / wall(fb)). On a VM whose speed drifts
    by a third within minutes, one kernel timed after the other measures the drift; the ratio of
    neighbouring batches does not."""
    fa(), fb()
    t = time.perf_counter()
    fa()
    calls = max(1, int(batch_s / max(time.perf_counter() - t, 1e-6)))
    rounds = {"a": [], "b": []}
    for _ in range(repeats):
        for key, fn in (("a", fa), ("b", fb)):
            t, c = time.perf_counter(), time.process_time()
            for _ in range(calls):
                fn()
            rounds[key].append(((time.perf_counter() - t) / calls, (time.process_time() - c) / calls))
    wall = {k: [w for w, _ in v] for k, v in rounds.items()}
    cpu = {k: [c for _, c in v] for k, v in rounds.items()}
    ratio = statistics.median(a / b for a, b in zip(wall["a"], wall["b"]))
    return (statistics.median(wall["a"]), statistics.median(wall["b"]), statistics.median(cpu["a"]),
            statistics.median(cpu["b"]), ratio)


def decode_section(S, L, hq, hkv, D, dtype, repeats, bs=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    nb = S * L // bs
    kc = torch.randn(nb, bs, hkv, D, generator=gen).to(dtype)
    vc = torch.randn(nb, bs, hkv, D, generator=gen).to(dtype)
    tables = torch.randperm(nb, generator=gen).int().view(S, L // bs).contiguous()
    lens = torch.full((S,), L, dtype=torch.int32)
    q = torch.randn(S, hq, D, generator=gen).to(dtype)
    scale = D ** -0.5

    def gather_sdpa():
        idx = tables.long()
        k = kc[idx].view(S, L, hkv, D).transpose(1, 2)  # [S, Hkv, L, D]
        v = vc[idx].view(S, L, hkv, D).transpose(1, 2)
        return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, scale=scale,
                                              enable_gqa=True).squeeze(2)

    def ours():
        return kv.paged_decode_attention(q, kc, vc, tables, lens, scale)

    err = (ours().float() - gather_sdpa().float()).abs().max().item()
    (w_peer, c_peer), (w_ours, c_ours) = bench(gather_sdpa, repeats), bench(ours, repeats)
    return {"S": S, "L": L, "hq": hq, "hkv": hkv, "D": D, "dtype": str(dtype).replace("torch.", ""),
            "gather_sdpa_ms": w_peer * 1e3, "ours_ms": w_ours * 1e3, "speedup": w_peer / w_ours,
            "gather_sdpa_cpu_ms": c_peer * 1e3, "ours_cpu_ms": c_ours * 1e3,
            "speedup_cpu_time": c_peer / c_ours, "max_abs_diff": err}


def bm_forked(cls, S: int, G: int, P: int, bs: int, steps: int, rep: int):
    """A manager holding S sequences (ids 0..S-1) forked in groups of G from distinct P-token
    prompts, with room for every sequence to grow by `steps` tokens."""
    B = S // G
    bm = cls(S * -(-(P + steps) // bs) + B, bs)
    for b in range(B):
        prompt = [1000 + (rep * B + b) * 7919 + i for i in range(P)]
        bm.allocate(-1 - b, prompt)
        bm.fork(-1 - b, list(range(b * G, (b + 1) * G)))
        bm.free(-1 - b)
    return bm


def bm_step(bm, ids: list[int]):
    """One decode step's bookkeeping, as the scheduler and model runner do it."""
    for sid in ids:
        if not bm.can_append(sid):
            raise RuntimeError("pool sized too small")
        bm.append_token(sid)
    return bm.decode_metadata(ids)


def block_manager_section(S, G, P, steps, repeats, bs=16):
    """Per-step wall and process-CPU microseconds of bm_step, native and Python: `repeats` fresh
    generations of `steps` steps each, after one untimed warm-up generation."""
    ids = list(range(S))
    wall = {"native": [], "python": []}  # every timed step, all repeats
    cpu = {"native": [], "python": []}
    per_repeat = []
    for rep in range(repeats + 1):
        bms = {"native": bm_forked(kv.NativeBlockManager, S, G, P, bs, steps, rep),
               "python": bm_forked(kv.PyBlockManager, S, G, P, bs, steps, rep)}
        rw = {"native": [], "python": []}
        rc = {"native": [], "python": []}
        for k in range(steps):
            out = {}
            for name in ("native", "python") if k % 2 == 0 else ("python", "native"):
                c0 = time.process_time()
                t0 = time.perf_counter()
                out[name] = bm_step(bms[name], ids)
                t1 = time.perf_counter()
                c1 = time.process_time()
                rw[name].append((t1 - t0) * 1e6)
                rc[name].append((c1 - c0) * 1e6)
            for a, b in zip(out["native"], out["python"]):
                assert torch.equal(a, b), f"managers disagree: S={S}, repeat {rep}, step {k}"
        if rep == 0:
            continue  # warm-up
        for name in wall:
            wall[name] += rw[name]
            cpu[name] += rc[name]
        n, py = statistics.median(rw["native"]), statistics.median(rw["python"])
        per_repeat.append({"native_us": n, "python_us": py, "ratio": py / n})

    def summary(name):
        q = statistics.quantiles(wall[name], n=10)
        return {"median_us": statistics.median(wall[name]), "p10_us": q[0], "p90_us": q[8],
                "cpu_median_us": statistics.median(cpu[name])}

    res = {"S": S, "G": G, "P": P, "steps": steps, "block_size": bs, "repeats": repeats,
           "native": summary("native"), "python": summary("python"), "per_repeat": per_repeat}
    res["ratio_median"] = res["python"]["median_us"] / res["native"]["median_us"]
    res["ratio_cpu_median"] = res["python"]["cpu_median_us"] / res["native"]["cpu_median_us"]
    return res

def grpo_layout(B: int, G: int, P: int, C: int, hkv: int, D: int, dtype, bs=16, seed=0):
    """Caches and the decode metadata of B x G sequences forked from B prompts of P tokens after C
    decoded tokens, as the sampler's BlockManager lays them out (random K/V values)."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = -(-(P + C + 1) // bs)
    bm = kv.BlockManager(B * G * per_seq + B, bs, enable_prefix_cache=False)
    ids = []
    for b in range(B):
        bm.allocate(-1 - b, [7 + b * 7919 + i for i in range(P)])
        bm.fork(-1 - b, [b * G + g for g in range(G)])
        bm.free(-1 - b)
        ids += [b * G + g for g in range(G)]
    for _ in range(C + 1):  # C decoded tokens, then the slot of the step's own token
        for sid in ids:
            bm.append_token(sid)
    _, tables, lens = bm.decode_metadata(ids)
    nb = bm.num_blocks
    kc = torch.randn(nb, bs, hkv, D, generator=gen).to(dtype)
    vc = torch.randn(nb, bs, hkv, D, generator=gen).to(dtype)
    groups = kv.cascade_groups(tables, lens, [i // G for i in ids], bs, min_prefix=1)
    return kc, vc, torch.as_tensor(tables), torch.as_tensor(lens), groups


def cascade_section(B, G, P, C, hq, hkv, D, dtype, repeats, device=torch.device("cpu")):
    kc, vc, tables, lens, groups = grpo_layout(B, G, P, C, hkv, D, dtype)
    S = B * G
    q = torch.randn(S, hq, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    scale = D ** -0.5
    rows, starts, prefix = (torch.as_tensor(a) for a in groups)
    # QK and PV: a multiply and an add per query head, key and dim, each; both kernels do them all
    flops = 4.0 * hq * D * float(lens.sum())
    shape = {"B": B, "G": G, "P": P, "C": C, "hq": hq, "hkv": hkv, "D": D, "dtype": str(dtype).replace("torch.", ""),
             "shared_prefix": int(prefix.max()), "flops": flops}
    if device.type == "cuda":
        q, kc, vc, tables, lens, rows, starts, prefix = (
            t.to(device) for t in (q, kc, vc, tables, lens, rows, starts, prefix))

    def paged():
        return kv.paged_decode_attention(q, kc, vc, tables, lens, scale)

    def cascade():
        return kv.cascade_decode_attention(q, kc, vc, tables, lens, scale, rows, starts, prefix)

    err = (cascade().float() - paged().float()).abs().max().item()
    if device.type == "cuda":
        # op level only, synchronized after each call; the achieved K/V read bandwidth instead of
        # the CPU's FLOP rate (decode attention is memory-bound there): every sequence's keys
        # (paged), each group's prefix once plus every sequence's own keys (cascade)
        (w_paged, _), (w_cas, _) = bench(paged, repeats, torch.cuda.synchronize), \
            bench(cascade, repeats, torch.cuda.synchronize)
        row_bytes = 2 * hkv * D * kc.element_size()
        paged_bytes = row_bytes * float(lens.sum())
        cascade_bytes = paged_bytes - row_bytes * float(prefix.sum()) * (G - 1)
        return {**shape, "paged_ms": w_paged * 1e3, "cascade_ms": w_cas * 1e3, "speedup": w_paged / w_cas,
                "max_abs_diff": err, "paged_bytes": paged_bytes, "cascade_bytes": cascade_bytes,
                "paged_gbps": paged_bytes / w_paged / 1e9, "cascade_gbps": cascade_bytes / w_cas / 1e9}

    # The sampler's own path: one DecodeStep per step, validated once, each layer's attention
    # launched directly (no torch.library dispatch, ~70-80 µs a call here, which the op-level
    # timing adds to both kernels).
    slots = torch.zeros(S, dtype=torch.int32)
    paged_step = DecodeStep(slots, tables, lens, scale, kc, hq)
    cascade_step = DecodeStep(slots, tables, lens, scale, kc, hq, groups=groups)

    # in alternation (bench_pair): speedups are medians of neighbouring batches' ratios
    w_paged, w_cas, c_paged, c_cas, speedup = bench_pair(paged, cascade, repeats)
    w_sp, w_sc, _, _, step_speedup = bench_pair(lambda: paged_step.attend(q, kc, vc),
                                                lambda: cascade_step.attend(q, kc, vc), repeats)
    return {**shape, "paged_ms": w_paged * 1e3, "cascade_ms": w_cas * 1e3,
            "speedup": speedup, "paged_cpu_ms": c_paged * 1e3, "cascade_cpu_ms": c_cas * 1e3,
            "speedup_cpu_time": c_paged / c_cas, "max_abs_diff": err,
            "step_paged_ms": w_sp * 1e3, "step_cascade_ms": w_sc * 1e3, "step_speedup": step_speedup,
            "paged_gflops": flops / w_paged / 1e9, "cascade_gflops": flops / w_cas / 1e9}


def cascade_table_cuda(result, repeats, quick, device):
    """The CUDA kernels at the issue's shapes (bf16 caches, as a GPU samples) and the threshold
    sweep for the CUDA min prefix."""
    C = 64
    print(f"\nCUDA cascade vs per-sequence paged decode attention ({torch.cuda.get_device_name(device)}), "
          f"B x G sequences after {C} decoded tokens, median of {repeats}; GB/s: the K/V bytes each kernel "
          "must read over its time")
    print(f"{'P':>6}{'B x G':>8}{'heads q/kv, D':>15}{'dtype':>10}{'paged ms':>10}{'cascade ms':>12}"
          f"{'speedup':>9}{'max |diff|':>12}{'| GB/s paged / cascade':>24}")
    shapes = [(9, 3, 64)] if quick else [(9, 3, 64), (12, 2, 128)]
    cfgs = [(1024, 4, 8), (1024, 2, 16), (4096, 4, 8), (128, 4, 8)]
    for P, B, G in cfgs[:1] if quick else cfgs:
        for hq, hkv, D in shapes:
            for dtype in (torch.bfloat16,):
                r = cascade_section(B, G, P, C, hq, hkv, D, dtype, repeats, device)
                result["cascade"].append(r)
                print(f"{P:>6}{f'{B} x {G}':>8}{f'{hq}/{hkv}, {D}':>15}{r['dtype']:>10}{r['paged_ms']:>10.3f}"
                      f"{r['cascade_ms']:>12.3f}{r['speedup']:>9.2f}{r['max_abs_diff']:>12.2e}"
                      f"{r['paged_gbps']:>13.0f} /{r['cascade_gbps']:>8.0f}")
    print("\nthreshold: the shortest shared prefix at which the CUDA cascade pays (SmolLM2 heads, bf16, 4 x 8)")
    for P in (16, 32, 64, 128, 256, 512) if not quick else (64,):
        r = cascade_section(4, 8, P, C, 9, 3, 64, torch.bfloat16, repeats, device)
        result["cascade_threshold"].append(r)
        print(f"  P = {P:>4}: paged {r['paged_ms']:.4f} ms, cascade {r['cascade_ms']:.4f} ms, speedup {r['speedup']:.2f}")


def gemm_ceiling_gflops(repeats: int = 5) -> float:
    """This machine's practical fp32 FLOP rate: the faster of torch's GEMM (MKL) and oneDNN's
    (grpo_fast.onednn_gemm) at 1,024 x 576 x 1,536, a shape both run near their peak; best of
    `repeats`. (MKL alone until 7 Dec: on AMD CPUs it runs AVX2 kernels, and read ~200 GFLOPS on
    a Zen 5 where oneDNN reads ~450.) An attention kernel that does the same FLOPs cannot be timed
    faster than FLOPs / this."""
    from grpo_fast import onednn_gemm

    a, b = torch.randn(1024, 576), torch.randn(576, 1536)
    products = [lambda: a @ b] + ([lambda: onednn_gemm.mm(a, b)] if onednn_gemm.available() else [])
    best = float("inf")
    for product in products:
        for _ in range(repeats + 1):
            t = time.perf_counter()
            for _ in range(10):
                product()
            best = min(best, (time.perf_counter() - t) / 10)
    return 2.0 * 1024 * 576 * 1536 / best / 1e9


def cascade_table(result, repeats, quick):
    C = 64
    print(f"\nCascade vs per-sequence paged decode attention: B x G sequences after {C} decoded tokens, "
          f"{repeats} rounds of ~20 ms batches of each kernel in alternation (medians; speedup: median of the "
          f"rounds' ratios)")
    print("(op: through kv.*_decode_attention; sampler path: DecodeStep.attend, as the sampler calls them;"
          " GFLOPS: both kernels' QK + PV FLOPs over the op-level time)")
    ceiling = gemm_ceiling_gflops()
    result["gemm_ceiling_gflops"] = ceiling
    print(f"this machine's fp32 GEMM ceiling (the faster of MKL and oneDNN, 1024 x 576 x 1536): {ceiling:.1f} GFLOPS")
    print(f"{'P':>6}{'B x G':>8}{'heads q/kv, D':>15}{'dtype':>10}{'paged ms':>10}{'cascade ms':>12}"
          f"{'speedup':>9}{'| CPU-time speedup':>19}{'| sampler path ms':>28}{'speedup':>9}{'max |diff|':>12}"
          f"{'| GFLOPS paged / cascade':>25}")
    shapes = [(9, 3, 64)] if quick else [(9, 3, 64), (12, 2, 128)]
    cfgs = [(128, 4, 8), (1024, 4, 8), (1024, 2, 16), (4096, 4, 8), (4096, 2, 16), (128, 2, 16)]
    for P, B, G in cfgs[:2] if quick else cfgs:
        for hq, hkv, D in shapes:
            for dtype in (torch.float32,) if quick else (torch.float32, torch.bfloat16):
                r = cascade_section(B, G, P, C, hq, hkv, D, dtype, repeats)
                result["cascade"].append(r)
                print(f"{P:>6}{f'{B} x {G}':>8}{f'{hq}/{hkv}, {D}':>15}{r['dtype']:>10}{r['paged_ms']:>10.2f}"
                      f"{r['cascade_ms']:>12.2f}{r['speedup']:>9.2f}{r['speedup_cpu_time']:>19.2f}"
                      f"{r['step_paged_ms']:>14.2f} /{r['step_cascade_ms']:>12.2f}{r['step_speedup']:>9.2f}"
                      f"{r['max_abs_diff']:>12.2e}{r['paged_gflops']:>14.1f} /{r['cascade_gflops']:>8.1f}")
    print("\nthreshold: the shortest shared prefix at which the cascade pays (SmolLM2 heads, 4 x 8; "
          "kv.cascade.CPU_MIN_PREFIX for fp32, CPU_MIN_PREFIX_AVX512 for fp32 on AVX-512, CPU_MIN_PREFIX_BF16_DOT for bf16 on AVX512-BF16)")
    print(f"  bf16 prefix item: {'AVX512-BF16' if _C.cpu_cascade_bf16_dot_products() else 'AVX2 (fp32 FMAs)'}")
    for dtype in (torch.float32, torch.bfloat16):
        for P in (16, 32, 48, 64, 96, 128, 192, 256):
            r = cascade_section(4, 8, P, C, 9, 3, 64, dtype, repeats)
            result["cascade_threshold"].append(r)
            print(f"  {r['dtype']:>8} P = {P:>4}: paged {r['paged_ms']:.3f} ms, cascade {r['cascade_ms']:.3f} ms, "
                  f"speedup {r['speedup']:.2f} (CPU time {r['speedup_cpu_time']:.2f}; sampler path {r['step_speedup']:.2f})")


SECTIONS = ("memory", "decode", "block_manager", "cascade")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--only", choices=SECTIONS, help="run one section; its JSON goes to "
                    "benchmarks/results/bench_kv-<section>-cpu-<time>.json")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_kv.json"),
                    help="JSON of a full (not --quick, not --only) run")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: the cascade section's CUDA kernels (needs --only cascade)")
    ap.add_argument("--json", default=None, help="also write the result JSON here (any run)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and (args.only != "cascade" or not torch.cuda.is_available()):
        ap.error("--device cuda: only with --only cascade, on a machine where torch sees a GPU")
    quick = args.quick
    run = set(SECTIONS) if args.only is None else {args.only}
    mem_cfgs = [(8, 8, 150, 256), (8, 16, 60, 512), (16, 8, 700, 256)]
    dec_cfgs = [(9, 3, 64), (32, 8, 128)]
    S, L = (8, 256) if quick else (32, 1024)
    result = {"env": bu.environment(device), "load_average_before": bu.load_average(),
              "memory": [], "decode": [], "block_manager": [], "cascade": [], "cascade_threshold": []}

    if "memory" in run:
        memory_table(result, mem_cfgs[:1] if quick else mem_cfgs)
    if "decode" in run:
        decode_table(result, dec_cfgs, S, L, args.repeats)
    if "block_manager" in run:
        block_manager_table(result, [32] if quick else [32, 256], 16 if quick else 64,
                            3 if quick else args.repeats)
    if "cascade" in run and device.type == "cuda":
        cascade_table_cuda(result, 5 if quick else args.repeats, quick, device)
    elif "cascade" in run:
        cascade_table(result, 3 if quick else args.repeats, quick)
    result["load_average_after"] = bu.load_average()
    result["complete"] = True
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.only is not None and not quick:
        print(f"\nwrote {bu.write_results(f'bench_kv-{args.only}', result)}")
    elif not quick:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.out}")


def memory_table(result, cfgs):
    print(f"KV memory, {BYTES_PER_TOKEN} B/token (SmolLM2-135M bf16); block 16 unless noted")
    print(f"{'B x G, P, C<=':<22}{'scheme':<16}{'prefill blk':>12}{'peak blk':>10}{'peak MiB':>10}"
          f"{'vs ours':>9}{'prompt tok computed':>21}")
    for B, G, P, C in cfgs:
        m = memory_section(B, G, P, C, 16)
        result["memory"].append(m)
        ours = m["schemes"]["ours"]["peak_tokens"]
        for name, r in m["schemes"].items():
            mib = r["peak_tokens"] * BYTES_PER_TOKEN / 2**20
            print(f"{f'{B} x {G}, {P}, {C}':<22}{name:<16}{r['blocks_after_prefill']:>12}"
                  f"{r['peak_blocks']:>10}{mib:>10.1f}{r['peak_tokens'] / ours:>9.2f}"
                  f"{r['prefill_tokens_computed']:>21}")


def decode_table(result, dec_cfgs, S, L, repeats):
    print(f"\nCPU paged decode attention, {S} seqs x {L} context, median of {repeats}")
    print(f"{'heads q/kv, D':<16}{'dtype':<10}{'gather+SDPA ms':>16}{'ours ms':>10}{'speedup':>9}"
          f"{'| CPU-time: peer ms':>20}{'ours ms':>10}{'speedup':>9}")
    for hq, hkv, D in dec_cfgs:
        for dtype in (torch.float32, torch.bfloat16):
            r = decode_section(S, L, hq, hkv, D, dtype, repeats)
            result["decode"].append(r)
            print(f"{f'{hq}/{hkv}, {D}':<16}{r['dtype']:<10}{r['gather_sdpa_ms']:>16.2f}"
                  f"{r['ours_ms']:>10.2f}{r['speedup']:>9.2f}{r['gather_sdpa_cpu_ms']:>20.2f}"
                  f"{r['ours_cpu_ms']:>10.2f}{r['speedup_cpu_time']:>9.2f}")


def block_manager_table(result, seqs, steps, repeats, G=8, P=100):
    print(f"\nBlock manager, one decode step's bookkeeping (can_append + append_token per sequence,"
          f" then decode_metadata), G = {G}, prompt {P} tokens, {steps} steps x {repeats} repeats")
    for S in seqs:
        r = block_manager_section(S, G, P, steps, repeats)
        result["block_manager"].append(r)
        for i, x in enumerate(r["per_repeat"]):
            print(f"  {S} seqs, repeat {i + 1:>2}: median step native {x['native_us']:8.1f} us, "
                  f"python {x['python_us']:8.1f} us, ratio {x['ratio']:5.1f}")
    print(f"{'seqs':<6}{'manager':<10}{'median us':>11}{'p10 us':>9}{'p90 us':>9}{'CPU us':>9}"
          f"{'python / native':>17}")
    for r in result["block_manager"]:
        for name in ("native", "python"):
            x = r[name]
            ratio = (f"{r['ratio_median']:.1f} (CPU {r['ratio_cpu_median']:.1f})"
                     if name == "python" else "")
            print(f"{r['S']:<6}{name:<10}{x['median_us']:>11.1f}{x['p10_us']:>9.1f}"
                  f"{x['p90_us']:>9.1f}{x['cpu_median_us']:>9.1f}{ratio:>17}")


if __name__ == "__main__":
    main()
