"""SDPA forward + backward on the CPU under a mask, K/V at their own heads (enable_gqa) vs repeated
to every query head (what HF's SDPA path does under a mask), at the shapes of one SmolLM2 layer
(9 query / 3 K/V heads, head_dim 64) in each training layout. What decides where
grpo_fast/train/kv_head_attention.py applies. The two alternate; every repeat after a warm-up is
printed, with the bytes autograd saves for each.

    python benchmarks/bench_sdpa_kv_heads.py [--repeats 5]
"""
import argparse
import time

import torch
import torch.nn.functional as F

Q_HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
# (label, rows, queries, keys): one layer's attention call in each layout, 4 x 8 rows per step
SHAPES = [
    ("packed, P=40 C=128 (one group: T = 40 + 8 x 127)", 1, 1056, 1056),
    ("packed, P=512 C=64 (T = 512 + 8 x 63)", 1, 1016, 1016),
    ("cached, P=40 C=128 (8 rows, 127 queries over 167 keys)", 8, 127, 167),
    ("cached, P=512 C=64 (8 rows, 63 over 575)", 8, 63, 575),
    ("cached, P=1024 C=128 (8 rows, 127 over 1,151)", 8, 127, 1151),
]


def saved_bytes(fn) -> int:
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per forward + backward")
    for label, n, tq, tk in SHAPES:
        q = torch.randn(n, Q_HEADS, tq, HEAD_DIM, requires_grad=True)
        k = torch.randn(n, KV_HEADS, tk, HEAD_DIM, requires_grad=True)
        v = torch.randn(n, KV_HEADS, tk, HEAD_DIM, requires_grad=True)
        # an additive mask as the layouts pass one: causal over the last tq keys, the rest open
        mask = torch.zeros(n, 1, tq, tk)
        mask[..., tk - tq:] = torch.full((tq, tq), float("-inf")).triu(1)

        def repeat(x):
            return x[:, :, None].expand(n, KV_HEADS, Q_HEADS // KV_HEADS, tk, HEAD_DIM).reshape(n, Q_HEADS, tk, HEAD_DIM)

        variants = {
            "K/V heads": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
            "repeated": lambda: F.scaled_dot_product_attention(q, repeat(k), repeat(v), attn_mask=mask),
        }
        times = {name: [] for name in variants}
        for rep in range(a.repeats + 1):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn().sum().backward()
                if rep:  # the first is a warm-up
                    times[name].append((time.perf_counter() - t0) * 1e3)
        print(label)
        for name, fn in variants.items():
            print(f"  {name:10s} {' '.join(f'{t:6.1f}' for t in times[name])}   saved {saved_bytes(fn) / 2**20:6.1f} MiB")


if __name__ == "__main__":
    main()
