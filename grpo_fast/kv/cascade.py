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

# The shortest shared prefix, in tokens, at which a group of >= 2 sequences is attended as a
# cascade on the CPU. Measured (benchmarks/RESULTS.md, issue 14, "Cascade decode attention"):
# at SmolLM2's 9/3 x 64 fp32 heads the cascade is within noise of the paged kernel from P = 48
# to 4,096 (0.93-1.12x; 0.69x at P = 32); in bf16 and at Qwen2.5-1.5B's 12/2 x 128 it reaches
# 1.2-2.5x at P >= 1,024 (one case 0.93x). So 64 is where it stops losing, not where it clearly
# pays: the CPU kernel does the paged kernel's FLOPs at about its rate (~22 GFLOPS), so reading
# the prefix once saves little on this 2-core CPU (see RESULTS.md for the arithmetic).
CPU_MIN_PREFIX = 64


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
