"""Few-row linear layers, our native CPU kernel (grpo_fast.models.cpu_ops.linear) vs torch's
F.linear (MKL), on SmolLM2-135M's projection shapes: 30 distinct weights per shape so they stream
from memory as in a decode step; rows = the decode batch. Best of 5, GFLOPS.

    python benchmarks/bench_gemm.py
"""
import time, torch
from grpo_fast.models import cpu_ops
torch.manual_seed(0)
shapes = [(1536, 576), (576, 1536), (576, 576), (192, 576)]
for rows in (1, 8, 32, 64):
    for n, k in shapes:
        ws = [torch.randn(n, k) for _ in range(30)]  # 30 layers' weights: stream from memory
        x = torch.randn(rows, k)
        flops = 2.0 * rows * n * k * len(ws)
        res = {}
        for name, fn in (("native", cpu_ops.linear), ("torch", torch.nn.functional.linear)):
            best = 1e9
            for _ in range(5):
                t = time.perf_counter()
                for w in ws:
                    fn(x, w)
                best = min(best, time.perf_counter() - t)
            res[name] = flops / best / 1e9
        print(f"rows {rows:3d} W [{n},{k}]  native {res['native']:6.1f} GFLOPS  torch {res['torch']:6.1f} GFLOPS")
