"""Few-row linear layers, our native CPU kernel (grpo_fast.models.cpu_ops.linear) vs torch's
F.linear (MKL) and oneDNN's linear (grpo_fast.onednn_gemm, on the weight as it lies), on
SmolLM2-135M's projection shapes and its LM head: distinct weights per shape (30, as many as the
layers; the LM head's 113 MB twice) so they stream from memory as in a decode step; rows = the
decode batch. Best of 5, GFLOPS. The native kernel's tiles are AVX-512 where the CPU has it
(GRPO_FAST_NO_AVX512=1: AVX2); MKL runs its AVX2 kernels on AMD CPUs, oneDNN picks by features.

    python benchmarks/bench_gemm.py
    python benchmarks/bench_gemm.py --rows 32      # the sampler's decode batch at 4 x 8
"""
import argparse, time, torch
from grpo_fast import onednn_gemm
from grpo_fast.models import cpu_ops
from grpo_fast.native import _C
ap = argparse.ArgumentParser()
ap.add_argument("--rows", default="1,8,32,64", help="comma-separated row counts")
args = ap.parse_args()
torch.manual_seed(0)
print(f"native tiles: {'AVX-512' if _C.cpu_avx512() else 'AVX2'}; oneDNN: {onednn_gemm.available()}")
shapes = [(1536, 576), (576, 1536), (576, 576), (192, 576), (49152, 576)]
kernels = [("native", cpu_ops.linear), ("torch", torch.nn.functional.linear)]
if onednn_gemm.available():
    kernels.append(("oneDNN", onednn_gemm.linear))
for rows in (int(r) for r in args.rows.split(",")):
    for n, k in shapes:
        copies = 30 if n * k < 10**7 else 2  # 30 layers' weights, or the LM head twice: from memory
        ws = [torch.randn(n, k) for _ in range(copies)]
        x = torch.randn(rows, k)
        flops = 2.0 * rows * n * k * len(ws)
        res = {}
        for name, fn in kernels:
            best = 1e9
            for _ in range(5):
                t = time.perf_counter()
                for w in ws:
                    fn(x, w)
                best = min(best, time.perf_counter() - t)
            res[name] = flops / best / 1e9
        print(f"rows {rows:3d} W [{n},{k}]  " + "  ".join(f"{name} {v:6.1f}" for name, v in res.items()) + "  GFLOPS")
