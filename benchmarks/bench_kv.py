"""KV-cache benchmark: (1) KV memory of B prompts x G completions under four storage schemes,
(2) CPU paged decode attention vs PyTorch gather + SDPA.

(1) runs the real BlockManager through a GRPO generation (prefill, G completions per prompt,
finished sequences freed) and records blocks held:
  ours            prefill each prompt once, fork G children sharing every block, the partial
                  last one included (copy-on-write at its first divergence);
  full-block      vLLM-style prefix caching: each child allocated on its own, full prompt blocks
                  shared through the hash cache, the partial last block stored (and computed) G times;
  full-block-256  the same with 256-token blocks (nano-vllm's default);
  per-sequence    no sharing: every sequence stores its prompt.
(2) times one decode attention call over S sequences x L context tokens in shuffled blocks.

  python benchmarks/bench_kv.py            # full run, JSON to benchmarks/results/bench_kv.json
  python benchmarks/bench_kv.py --quick    # smaller shapes (smoke test)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from grpo_fast import kv

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
                bm.append_token(sid, 0)
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


def bench(fn, repeats):
    """(median wall seconds, median process CPU seconds summed over threads) per call. CPU
    time is the fairer number on a shared machine: it does not count time spent descheduled."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


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


def environment():
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "unknown"
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"device": f"CPU: {cpu}, {os.cpu_count()} cores", "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "commit": commit}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_kv.json"))
    args = ap.parse_args()
    quick = args.quick
    mem_cfgs = [(8, 8, 150, 256), (8, 16, 60, 512), (16, 8, 700, 256)]
    dec_cfgs = [(9, 3, 64), (32, 8, 128)]
    S, L = (8, 256) if quick else (32, 1024)
    result = {"env": environment(), "memory": [], "decode": []}

    print(f"KV memory, {BYTES_PER_TOKEN} B/token (SmolLM2-135M bf16); block 16 unless noted")
    print(f"{'B x G, P, C<=':<22}{'scheme':<16}{'prefill blk':>12}{'peak blk':>10}{'peak MiB':>10}"
          f"{'vs ours':>9}{'prompt tok computed':>21}")
    for B, G, P, C in mem_cfgs[:1] if quick else mem_cfgs:
        m = memory_section(B, G, P, C, 16)
        result["memory"].append(m)
        ours = m["schemes"]["ours"]["peak_tokens"]
        for name, r in m["schemes"].items():
            mib = r["peak_tokens"] * BYTES_PER_TOKEN / 2**20
            print(f"{f'{B} x {G}, {P}, {C}':<22}{name:<16}{r['blocks_after_prefill']:>12}"
                  f"{r['peak_blocks']:>10}{mib:>10.1f}{r['peak_tokens'] / ours:>9.2f}"
                  f"{r['prefill_tokens_computed']:>21}")

    print(f"\nCPU paged decode attention, {S} seqs x {L} context, median of {args.repeats}")
    print(f"{'heads q/kv, D':<16}{'dtype':<10}{'gather+SDPA ms':>16}{'ours ms':>10}{'speedup':>9}"
          f"{'| CPU-time: peer ms':>20}{'ours ms':>10}{'speedup':>9}")
    for hq, hkv, D in dec_cfgs:
        for dtype in (torch.float32, torch.bfloat16):
            r = decode_section(S, L, hq, hkv, D, dtype, args.repeats)
            result["decode"].append(r)
            print(f"{f'{hq}/{hkv}, {D}':<16}{r['dtype']:<10}{r['gather_sdpa_ms']:>16.2f}"
                  f"{r['ours_ms']:>10.2f}{r['speedup']:>9.2f}{r['gather_sdpa_cpu_ms']:>20.2f}"
                  f"{r['ours_cpu_ms']:>10.2f}{r['speedup_cpu_time']:>9.2f}")
    if not quick:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
