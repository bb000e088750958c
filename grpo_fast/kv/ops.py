"""Public KV-cache ops: validated wrappers over the native kernels, registered as torch ops.

Each op validates its tensors (ValueError naming the argument), then calls a
`torch.library.custom_op` in the "grpo_fast" namespace so it traces under torch.compile. The op
body launches the C++ core (`grpo_fast._C`, through grpo_fast.kv.launch): the OpenMP CPU kernels
for CPU tensors, the CUDA kernels (on the current stream) for CUDA tensors. Without a native build the plain-PyTorch
reference (`grpo_fast.kv.reference`) runs instead, with the same contract.
"""
from __future__ import annotations

import torch

from grpo_fast import checks
from grpo_fast.native import native_for

from . import launch
from . import reference as ref

__all__ = ["append_kv", "cache_pair", "copy_blocks", "gather_kv", "paged_decode_attention", "prefill_attention"]

_I32 = (torch.int32,)


def cache_pair(key_cache, value_cache) -> tuple[int, int, int, int]:
    """Both caches [num_blocks, block_size, Hkv, D], same dtype/device/shape. Returns the shape."""
    checks.tensor("key_cache", key_cache, ndim=4, dtypes=checks.FLOAT_DTYPES)
    checks.tensor("value_cache", value_cache, dtypes=(key_cache.dtype,), device=key_cache.device,
                  shape=tuple(key_cache.shape))
    if key_cache.device.type == "cpu" and key_cache.dtype == torch.float16:
        raise ValueError("key_cache: float16 is supported on CUDA only; use float32 or bfloat16 on CPU")
    return tuple(key_cache.shape)


# ---- append_kv --------------------------------------------------------------------------------

@torch.library.custom_op("grpo_fast::append_kv", mutates_args=("key_cache", "value_cache"))
def _append_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    n = native_for(key_cache, "append_kv")
    if n is None:
        return ref.append_kv(key_cache, value_cache, key, value, slot_mapping)
    launch.append_kv(n, key_cache, value_cache, key, value, slot_mapping)


def append_kv(key_cache, value_cache, key, value, slot_mapping) -> None:
    """Write K, V of T new tokens into their slots: cache.view(-1, Hkv, D)[slot[t]] = key[t].

    key_cache, value_cache [num_blocks, block_size, Hkv, D]; key, value [T, Hkv, D] of the cache
    dtype; slot_mapping [T] int32, -1 skips a token (padding). Slots must be distinct.
    """
    nb, bs, h, d = cache_pair(key_cache, value_cache)
    dev, dt = key_cache.device, key_cache.dtype
    checks.tensor("key", key, ndim=3, dtypes=(dt,), device=dev, shape=(None, h, d))
    T = key.shape[0]
    checks.tensor("value", value, ndim=3, dtypes=(dt,), device=dev, shape=(T, h, d))
    checks.tensor("slot_mapping", slot_mapping, ndim=1, dtypes=_I32, device=dev, shape=(T,))
    _append_kv(key_cache, value_cache, key, value, slot_mapping)


# ---- copy_blocks ------------------------------------------------------------------------------

@torch.library.custom_op("grpo_fast::copy_blocks", mutates_args=("key_cache", "value_cache"))
def _copy_blocks(key_cache: torch.Tensor, value_cache: torch.Tensor,
                 block_mapping: torch.Tensor) -> None:
    n = native_for(key_cache, "copy_blocks")
    if n is None:
        return ref.copy_blocks(key_cache, value_cache, block_mapping)
    launch.copy_blocks(n, key_cache, value_cache, block_mapping)


def copy_blocks(key_cache, value_cache, block_mapping) -> None:
    """Copy-on-write copies: cache[dst] = cache[src] for each row (src, dst) of block_mapping
    [M, 2] int64 (or int32), as returned by BlockManager.append_token. dst blocks are distinct
    and never a src of the same call."""
    nb, _, _, _ = cache_pair(key_cache, value_cache)
    if isinstance(block_mapping, (list, tuple)):
        block_mapping = torch.tensor(block_mapping, dtype=torch.int64).reshape(-1, 2)
    checks.tensor("block_mapping", block_mapping, ndim=2, dtypes=(torch.int64, torch.int32),
             shape=(None, 2))
    if block_mapping.shape[0] == 0:
        return
    if block_mapping.device != key_cache.device or block_mapping.dtype != torch.int64:
        block_mapping = block_mapping.to(device=key_cache.device, dtype=torch.int64)
    _copy_blocks(key_cache, value_cache, block_mapping)


# ---- gather (for prefills that hit the prefix cache) -------------------------------------------

def gather_kv(key_cache, value_cache, slot_mapping):
    """K, V of the given slots, contiguous: ([T, Hkv, D], [T, Hkv, D]).

    For a prompt whose first `cached` tokens hit the prefix cache: gather their K/V with
    `bm.slot_mapping(seq, 0, cached)`, put them in front of the new tokens' K/V and call
    `prefill_attention(..., cu_seqlens_k=...)`. A plain index_select (memory-bound, any device).
    """
    nb, bs, h, d = cache_pair(key_cache, value_cache)
    checks.tensor("slot_mapping", slot_mapping, ndim=1, dtypes=_I32, device=key_cache.device)
    idx = slot_mapping.long()
    return (key_cache.view(nb * bs, h, d).index_select(0, idx),
            value_cache.view(nb * bs, h, d).index_select(0, idx))


# ---- paged decode attention -------------------------------------------------------------------

@torch.library.custom_op("grpo_fast::paged_decode_attention", mutates_args=())
def _paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor,
                            value_cache: torch.Tensor, block_tables: torch.Tensor,
                            context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    n = native_for(query, "paged_decode_attention")
    if n is None:
        return ref.paged_decode_attention(query, key_cache, value_cache, block_tables,
                                          context_lens, scale)
    return launch.paged_decode_attention(n, query, key_cache, value_cache, block_tables, context_lens, scale)


@_paged_decode_attention.register_fake
def _(query, key_cache, value_cache, block_tables, context_lens, scale):
    return torch.empty_like(query)


def _check_decode_args(query, key_cache, value_cache, block_tables, context_lens, scale) -> float:
    """The arguments paged and cascade decode attention share; returns scale as a float."""
    nb, bs, hkv, d = cache_pair(key_cache, value_cache)
    dev = key_cache.device
    checks.tensor("query", query, ndim=3, dtypes=(key_cache.dtype,), device=dev, shape=(None, None, d))
    S, hq = query.shape[0], query.shape[1]
    if hq % hkv != 0:
        raise ValueError(f"query has {hq} heads, not a multiple of the cache's {hkv} kv heads")
    checks.tensor("block_tables", block_tables, ndim=2, dtypes=_I32, device=dev, shape=(S, None))
    checks.tensor("context_lens", context_lens, ndim=1, dtypes=_I32, device=dev, shape=(S,))
    scale = checks.positive_float("scale", scale)
    if not torch.compiler.is_compiling() and dev.type == "cpu" and S > 0:
        # cheap host-side bound check on CPU (a CUDA check would sync the stream)
        if int(context_lens.max()) > block_tables.shape[1] * bs or int(context_lens.min()) < 0:
            raise ValueError("context_lens must lie in [0, block_tables.shape[1] * block_size]")
    return scale


def paged_decode_attention(query, key_cache, value_cache, block_tables, context_lens, scale):
    """One query token per sequence attending over its paged K/V.

    out[s, h] = sum_j softmax_j(q[s,h] . K[s,j,g] * scale) V[s,j,g], j < context_lens[s],
    g = h // (Hq / Hkv) (GQA, any integer ratio); token j of s lives in block
    block_tables[s, j // block_size] at offset j % block_size. Scores, softmax and the weighted
    sum accumulate in fp32. query [S, Hq, D] -> out [S, Hq, D] (query dtype); block_tables
    [S, max_blocks] int32 (unused entries may be -1); context_lens [S] int32 (0 gives zeros).
    """
    scale = _check_decode_args(query, key_cache, value_cache, block_tables, context_lens, scale)
    return _paged_decode_attention(query, key_cache, value_cache, block_tables, context_lens,
                                   scale)


# ---- cascade decode attention -----------------------------------------------------------------

@torch.library.custom_op("grpo_fast::cascade_decode_attention", mutates_args=())
def _cascade_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                              block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                              group_rows: torch.Tensor, group_starts: torch.Tensor,
                              prefix_lens: torch.Tensor) -> torch.Tensor:
    n = native_for(query, "cascade_decode_attention")
    if n is None:
        return ref.cascade_decode_attention(query, key_cache, value_cache, block_tables, context_lens, scale,
                                            group_rows, group_starts, prefix_lens)
    return launch.cascade_decode_attention(n, query, key_cache, value_cache, block_tables, context_lens, scale,
                                           group_rows, group_starts, prefix_lens)


@_cascade_decode_attention.register_fake
def _(query, key_cache, value_cache, block_tables, context_lens, scale, group_rows, group_starts, prefix_lens):
    return torch.empty_like(query)


def cascade_decode_attention(query, key_cache, value_cache, block_tables, context_lens, scale, group_rows,
                             group_starts, prefix_lens):
    """paged_decode_attention for sequences in groups that share a prefix (GRPO's G completions
    of one prompt): the same output (to fp32 rounding), with each group's shared prefix attended
    once for all its sequences (their queries as one block against each prefix key) and merged
    exactly with each sequence's own keys through the log-sum-exp.

    query, caches, block_tables, context_lens, scale: as paged_decode_attention. group_rows [S]
    int32: the rows ordered by group, a permutation of range(S); group_starts [G + 1] int32: group
    g is group_rows[group_starts[g]:group_starts[g + 1]]; prefix_lens [G] int32: tokens at the
    head of every row of g that lie in the same blocks of each row's table (0: nothing shared).
    `kv.cascade.cascade_groups` builds these from a step's tables. On the CPU the kernel checks
    that each prefix lies in shared blocks; on CUDA that is the caller's promise (a host check
    would synchronize).
    """
    scale = _check_decode_args(query, key_cache, value_cache, block_tables, context_lens, scale)
    dev, S = key_cache.device, query.shape[0]
    checks.tensor("group_rows", group_rows, dtypes=_I32, device=dev, shape=(S,))
    checks.tensor("prefix_lens", prefix_lens, ndim=1, dtypes=_I32, device=dev)
    checks.tensor("group_starts", group_starts, dtypes=_I32, device=dev, shape=(prefix_lens.shape[0] + 1,))
    return _cascade_decode_attention(query, key_cache, value_cache, block_tables, context_lens, scale, group_rows,
                                     group_starts, prefix_lens)


# ---- prefill attention ------------------------------------------------------------------------

@torch.library.custom_op("grpo_fast::prefill_attention", mutates_args=())
def _prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       cu_seqlens: torch.Tensor, cu_seqlens_k: torch.Tensor,
                       scale: float) -> torch.Tensor:
    n = native_for(query, "prefill_attention")
    if n is None:
        return ref.prefill_attention(query, key, value, cu_seqlens, scale, cu_seqlens_k)
    return launch.prefill_attention(n, query, key, value, cu_seqlens, cu_seqlens_k, scale)


@_prefill_attention.register_fake
def _(query, key, value, cu_seqlens, cu_seqlens_k, scale):
    return torch.empty_like(query)


def prefill_attention(query, key, value, cu_seqlens, scale, cu_seqlens_k=None):
    """Causal attention over packed variable-length prompts (fp32 accumulation, GQA).

    query [T, Hq, D]; key, value [Tk, Hkv, D]; cu_seqlens [B+1] int32 query offsets; cu_seqlens_k
    [B+1] int32 key offsets (default cu_seqlens). Query i of sequence b (of nq queries over nk
    keys) attends keys j <= nk - nq + i (bottom-right aligned, so a prefix-cache hit can gather
    its cached K/V in front of the new tokens). Returns out [T, Hq, D].

    Why contiguous, then `append_kv` into blocks: a prompt is processed once, its K/V are
    already contiguous in the forward pass, and a dense causal pass over them is the fastest
    attention there is (no block-table indirection); writing them into blocks afterwards is one
    cheap scatter. Paging only matters for decode, where sequences grow and share blocks.

    On the CPU (AVX2, head_dim % 8 == 0) a prompt's tokens go in blocks of 48 / (Hq / Hkv): the
    keys a block's tokens all see are attended by all of them at once (the cascade's prefix item,
    a small GEMM per key chunk), the causal diagonal per token, the two merged exactly; 2.4x the
    per-token kernel at 4 x 1,024-token prompts (RESULTS.md, "Queries in the vector lanes",
    item 2).
    GRPO_FAST_NO_BLOCKED_PREFILL=1 keeps the per-token kernel.
    """
    dev, dt = query.device, query.dtype
    checks.tensor("query", query, ndim=3, dtypes=checks.FLOAT_DTYPES)
    if dev.type == "cpu" and dt == torch.float16:
        raise ValueError("query: float16 is supported on CUDA only; use float32 or bfloat16")
    T, hq, d = query.shape
    checks.tensor("key", key, ndim=3, dtypes=(dt,), device=dev, shape=(None, None, d))
    hkv = key.shape[1]
    checks.tensor("value", value, ndim=3, dtypes=(dt,), device=dev, shape=tuple(key.shape))
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query has {hq} heads, not a multiple of key's {hkv} heads")
    checks.tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=_I32, device=dev)
    if cu_seqlens.shape[0] < 1:
        raise ValueError("cu_seqlens must have at least one entry")
    if cu_seqlens_k is None:
        if key.shape[0] != T:
            raise ValueError(f"key has {key.shape[0]} rows but query {T}; pass cu_seqlens_k")
        cu_seqlens_k = cu_seqlens
    checks.tensor("cu_seqlens_k", cu_seqlens_k, ndim=1, dtypes=_I32, device=dev,
             shape=(cu_seqlens.shape[0],))
    scale = checks.positive_float("scale", scale)
    if not torch.compiler.is_compiling() and dev.type == "cpu":
        for name, cu, total in (("cu_seqlens", cu_seqlens, T),
                                ("cu_seqlens_k", cu_seqlens_k, key.shape[0])):
            if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
                raise ValueError(f"{name} must rise from 0 to {total}")
        if bool(((cu_seqlens_k[1:] - cu_seqlens_k[:-1]) < (cu_seqlens[1:] - cu_seqlens[:-1])).any()):
            raise ValueError("cu_seqlens_k: each sequence needs at least as many keys as queries")
    return _prefill_attention(query, key, value, cu_seqlens, cu_seqlens_k, scale)
