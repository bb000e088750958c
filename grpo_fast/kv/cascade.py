"""Cascade decode attention's step metadata: which rows of a decode step share a prefix.

The G completions of a GRPO group share their prompt's KV blocks. Cascade attention
(kv.cascade_decode_attention) attends over that shared prefix once for the whole group — the
G × (Hq / Hkv) queries of a kv head as one block against each prefix key, read once — then over
each sequence's own keys, and merges the two softmaxes exactly. It pays when the prefix is long
and the group large: below ``min_prefix`` tokens a group is attended per sequence (its prefix
length is 0), and a step with no group above it runs the plain paged kernel.

    groups = cascade_groups(tables, lens, group_ids, block_size, min_prefix=CPU_MIN_PREFIX)
    # None, or (group_rows [S], group_starts [G + 1], prefix_lens [G]) int32 numpy arrays

What a group shares is read off the block tables, not assumed: the leading blocks that are the
same physical block in every row of the group (the prompt's full blocks; the partial last one is
copied on the first write, and a preempted and recomputed sequence may share less or nothing).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

# The shortest shared prefix, in tokens, at which a group of >= 2 sequences is attended as a
# cascade on the CPU. Measured (benchmarks/RESULTS.md, "Decode kernels on the AVX512 machine",
# 7 Dec): with both kernels timed in alternation, at SmolLM2's 9/3 x 64 fp32 heads, 4 x 8, the
# cascade loses below ~100 shared keys (0.85-0.99x at P = 16-96) and wins from 128 on (1.03-1.06x
# at 128, 1.10x at 192, 1.2x at 256, 1.45-1.6x at 1,024); the sampler's own path agrees (1.10-1.12x
# at 128). Its prefix pass is a register-blocked GEMM; below ~128 keys the packing and the
# softmax merge cost more than the G-fold K/V reads they save. (It was 64 until then, measured
# with one kernel timed after the other, which on this VM measured its speed drift.)
CPU_MIN_PREFIX = 128
# The same for a bf16 cache on a CPU with AVX512-BF16, where the prefix pass multiplies bf16 pairs
# straight from the cache (csrc/cascade_bf16_cpu.cpp): at the same heads and batch it loses at 16
# shared keys (0.88x), breaks even at 32, and wins from 48 on (1.06x; 1.09-1.17x at 64, 1.3-1.45x
# at 128; RESULTS.md, "bf16 cascade on AVX512-BF16", 7 Dec). Against the per-sequence kernel
# once its scores also ran on vdpbf16ps: 0.96x at 48, 1.03x at 64 (1.08x on the sampler's path),
# 1.21x at 128 ("The per-sequence bf16 kernel's scores on vdpbf16ps"): 64 still.
CPU_MIN_PREFIX_BF16_DOT = 64
# The same for an fp32 cache on a CPU with AVX-512, where the prefix item runs on zmm (16 queries
# a register, bit for bit its ymm build's output): SmolLM2's heads, 4 x 8, both kernels
# alternating in one process (DecodeStep.attend, medians of 15): 1.01x at 32 shared keys, 1.02x at
# 48, 1.12x at 64, 1.23x at 96 (RESULTS.md, "fp32 on AVX-512 and oneDNN", 7 Dec); with the item's
# queries in the lanes (csrc/cascade_f32_cpu.cpp) 0.99x at 32, 1.04x at 48, 1.13x at 64, 1.31x at
# 128, and on ymm (GRPO_FAST_NO_AVX512=1) 0.88x at 64, 1.01x at 128 (RESULTS.md, "Queries in the
# vector lanes", item 1, 7 Dec): 64 and 128 stand.
CPU_MIN_PREFIX_AVX512 = 64


def cpu_min_prefix(dtype) -> int:
    """The CPU threshold for a cache of this dtype (None: fp32) on this machine."""
    from grpo_fast.native import _C

    if _C is None:
        return CPU_MIN_PREFIX
    if dtype == torch.bfloat16 and getattr(_C, "cpu_cascade_bf16_dot_products", lambda: False)():
        return CPU_MIN_PREFIX_BF16_DOT
    if dtype in (None, torch.float32) and getattr(_C, "cpu_avx512", lambda: False)():
        return CPU_MIN_PREFIX_AVX512
    return CPU_MIN_PREFIX


class CascadeGroups(NamedTuple):
    rows: np.ndarray    # [S] int32: the step's rows ordered by group
    starts: np.ndarray  # [G + 1] int32: group g is rows[starts[g]:starts[g + 1]]
    prefix: np.ndarray  # [G] int32: tokens shared by the group's rows (0: none attended as shared)


def cascade_groups(block_tables: np.ndarray, context_lens: np.ndarray, group_ids, block_size: int,
                   min_prefix: int) -> CascadeGroups | None:
    """The cascade metadata of one decode step, or None when no group shares >= min_prefix tokens.

    block_tables [S, W], context_lens [S] (int32, as BlockManager.decode_metadata returns them);
    group_ids [S]: any integer key per row (the sampler's group index), rows with equal keys may
    share a prefix. A group's prefix = its rows' common leading blocks x block_size, capped by
    its shortest context; below min_prefix, or for a lone row, 0."""
    ids = np.asarray(group_ids)
    block_tables, context_lens = np.asarray(block_tables), np.asarray(context_lens)
    num = ids.shape[0]
    if num == 0:
        return None
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    first = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])  # [G] group starts
    sizes = np.diff(np.r_[first, num])
    if sizes.max() < 2:
        return None
    tables = block_tables[order]  # [S, W]
    lead_row = np.repeat(first, sizes)  # each row's group's first row (in sorted order)
    same = tables == tables[lead_row]  # [S, W]
    leading = np.cumprod(same, axis=1).sum(axis=1)  # common leading blocks with the group's first row
    common = np.minimum.reduceat(leading, first) * block_size
    shortest = np.minimum.reduceat(context_lens[order], first)
    prefix = np.minimum(common, shortest)
    prefix[(prefix < min_prefix) | (sizes < 2)] = 0
    if not prefix.any():
        return None
    return CascadeGroups(order.astype(np.int32), np.r_[first, num].astype(np.int32), prefix.astype(np.int32))
