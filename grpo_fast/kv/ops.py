"""Public KV-cache ops: validated wrappers over the native kernels, registered as torch ops.

Each op validates its tensors (ValueError naming the argument), then calls a
`torch.library.custom_op` in the "grpo_fast" namespace so it traces under torch.compile. The op
body hands raw pointers to the C++ core (`grpo_fast._C`): the OpenMP CPU kernels for CPU tensors,
the CUDA kernels (on the current stream) for CUDA tensors. Without a native build the plain-PyTorch
reference (`grpo_fast.kv.reference`) runs instead, with the same contract.
"""
from __future__ import annotations

import torch

from . import _validate as V
from . import reference as ref
from ._native import dtype_code, native_for

__all__ = ["append_kv", "copy_blocks", "gather_kv", "paged_decode_attention", "prefill_attention",
           "sample"]

_I32 = (torch.int32,)


# ---- append_kv --------------------------------------------------------------------------------

@torch.library.custom_op("grpo_fast::append_kv", mutates_args=("key_cache", "value_cache"))
def _append_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    n = native_for(key_cache, "append_kv")
    if n is None:
        return ref.append_kv(key_cache, value_cache, key, value, slot_mapping)
    nb, bs, h, d = key_cache.shape
    n.append_kv(key_cache.data_ptr(), value_cache.data_ptr(), key.data_ptr(), value.data_ptr(),
                slot_mapping.data_ptr(), key.shape[0], nb * bs, h, d, dtype_code(key_cache),
                *n.stream_args(key_cache))


def append_kv(key_cache, value_cache, key, value, slot_mapping) -> None:
    """Write K, V of T new tokens into their slots: cache.view(-1, Hkv, D)[slot[t]] = key[t].

    key_cache, value_cache [num_blocks, block_size, Hkv, D]; key, value [T, Hkv, D] of the cache
    dtype; slot_mapping [T] int32, -1 skips a token (padding). Slots must be distinct.
    """
    nb, bs, h, d = V.cache_pair(key_cache, value_cache)
    dev, dt = key_cache.device, key_cache.dtype
    V.tensor("key", key, ndim=3, dtypes=(dt,), device=dev, shape=(None, h, d))
    T = key.shape[0]
    V.tensor("value", value, ndim=3, dtypes=(dt,), device=dev, shape=(T, h, d))
    V.tensor("slot_mapping", slot_mapping, ndim=1, dtypes=_I32, device=dev, shape=(T,))
    _append_kv(key_cache, value_cache, key, value, slot_mapping)


# ---- copy_blocks ------------------------------------------------------------------------------

@torch.library.custom_op("grpo_fast::copy_blocks", mutates_args=("key_cache", "value_cache"))
def _copy_blocks(key_cache: torch.Tensor, value_cache: torch.Tensor,
                 block_mapping: torch.Tensor) -> None:
    n = native_for(key_cache, "copy_blocks")
    if n is None:
        return ref.copy_blocks(key_cache, value_cache, block_mapping)
    nb, bs, h, d = key_cache.shape
    n.copy_blocks(key_cache.data_ptr(), value_cache.data_ptr(), block_mapping.data_ptr(),
                  block_mapping.shape[0], nb, bs * h * d, dtype_code(key_cache),
                  *n.stream_args(key_cache))


def copy_blocks(key_cache, value_cache, block_mapping) -> None:
    """Copy-on-write copies: cache[dst] = cache[src] for each row (src, dst) of block_mapping
    [M, 2] int64 (or int32), as returned by BlockManager.append_token. dst blocks are distinct
    and never a src of the same call."""
    nb, _, _, _ = V.cache_pair(key_cache, value_cache)
    if isinstance(block_mapping, (list, tuple)):
        block_mapping = torch.tensor(block_mapping, dtype=torch.int64).reshape(-1, 2)
    V.tensor("block_mapping", block_mapping, ndim=2, dtypes=(torch.int64, torch.int32),
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
    nb, bs, h, d = V.cache_pair(key_cache, value_cache)
    V.tensor("slot_mapping", slot_mapping, ndim=1, dtypes=_I32, device=key_cache.device)
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
    S, hq, d = query.shape
    nb, bs, hkv, _ = key_cache.shape
    out = torch.empty_like(query)
    n.paged_decode_attention(out.data_ptr(), query.data_ptr(), key_cache.data_ptr(),
                             value_cache.data_ptr(), block_tables.data_ptr(),
                             context_lens.data_ptr(), S, hq, hkv, d, bs, block_tables.shape[1],
                             nb, float(scale), dtype_code(query), *n.stream_args(query))
    return out


@_paged_decode_attention.register_fake
def _(query, key_cache, value_cache, block_tables, context_lens, scale):
    return torch.empty_like(query)


def paged_decode_attention(query, key_cache, value_cache, block_tables, context_lens, scale):
    """One query token per sequence attending over its paged K/V.

    out[s, h] = sum_j softmax_j(q[s,h] . K[s,j,g] * scale) V[s,j,g], j < context_lens[s],
    g = h // (Hq / Hkv) (GQA, any integer ratio); token j of s lives in block
    block_tables[s, j // block_size] at offset j % block_size. Scores, softmax and the weighted
    sum accumulate in fp32. query [S, Hq, D] -> out [S, Hq, D] (query dtype); block_tables
    [S, max_blocks] int32 (unused entries may be -1); context_lens [S] int32 (0 gives zeros).
    """
    nb, bs, hkv, d = V.cache_pair(key_cache, value_cache)
    dev = key_cache.device
    V.tensor("query", query, ndim=3, dtypes=(key_cache.dtype,), device=dev, shape=(None, None, d))
    S, hq = query.shape[0], query.shape[1]
    if hq % hkv != 0:
        raise ValueError(f"query has {hq} heads, not a multiple of the cache's {hkv} kv heads")
    V.tensor("block_tables", block_tables, ndim=2, dtypes=_I32, device=dev, shape=(S, None))
    V.tensor("context_lens", context_lens, ndim=1, dtypes=_I32, device=dev, shape=(S,))
    scale = V.scalar_float("scale", scale)
    if not torch.compiler.is_compiling() and dev.type == "cpu" and S > 0:
        # cheap host-side bound check on CPU (a CUDA check would sync the stream)
        if int(context_lens.max()) > block_tables.shape[1] * bs or int(context_lens.min()) < 0:
            raise ValueError("context_lens must lie in [0, block_tables.shape[1] * block_size]")
    return _paged_decode_attention(query, key_cache, value_cache, block_tables, context_lens,
                                   scale)


# ---- prefill attention ------------------------------------------------------------------------

@torch.library.custom_op("grpo_fast::prefill_attention", mutates_args=())
def _prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       cu_seqlens: torch.Tensor, cu_seqlens_k: torch.Tensor,
                       scale: float) -> torch.Tensor:
    n = native_for(query, "prefill_attention")
    if n is None:
        return ref.prefill_attention(query, key, value, cu_seqlens, scale, cu_seqlens_k)
    T, hq, d = query.shape
    hkv = key.shape[1]
    out = torch.empty_like(query)
    n.prefill_attention(out.data_ptr(), query.data_ptr(), key.data_ptr(), value.data_ptr(),
                        cu_seqlens.data_ptr(), cu_seqlens_k.data_ptr(), cu_seqlens.shape[0] - 1,
                        T, hq, hkv, d, float(scale), dtype_code(query), *n.stream_args(query))
    return out


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
    """
    dev, dt = query.device, query.dtype
    V.tensor("query", query, ndim=3, dtypes=V.FLOAT_DTYPES)
    if dev.type == "cpu" and dt == torch.float16:
        raise ValueError("query: float16 is supported on CUDA only; use float32 or bfloat16")
    T, hq, d = query.shape
    V.tensor("key", key, ndim=3, dtypes=(dt,), device=dev, shape=(None, None, d))
    hkv = key.shape[1]
    V.tensor("value", value, ndim=3, dtypes=(dt,), device=dev, shape=tuple(key.shape))
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query has {hq} heads, not a multiple of key's {hkv} heads")
    V.tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=_I32, device=dev)
    if cu_seqlens.shape[0] < 1:
        raise ValueError("cu_seqlens must have at least one entry")
    if cu_seqlens_k is None:
        if key.shape[0] != T:
            raise ValueError(f"key has {key.shape[0]} rows but query {T}; pass cu_seqlens_k")
        cu_seqlens_k = cu_seqlens
    V.tensor("cu_seqlens_k", cu_seqlens_k, ndim=1, dtypes=_I32, device=dev,
             shape=(cu_seqlens.shape[0],))
    scale = V.scalar_float("scale", scale)
    if not torch.compiler.is_compiling() and dev.type == "cpu":
        for name, cu, total in (("cu_seqlens", cu_seqlens, T),
                                ("cu_seqlens_k", cu_seqlens_k, key.shape[0])):
            if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
                raise ValueError(f"{name} must rise from 0 to {total}")
        if bool(((cu_seqlens_k[1:] - cu_seqlens_k[:-1]) < (cu_seqlens[1:] - cu_seqlens[:-1])).any()):
            raise ValueError("cu_seqlens_k: each sequence needs at least as many keys as queries")
    return _prefill_attention(query, key, value, cu_seqlens, cu_seqlens_k, scale)


# ---- sampling ---------------------------------------------------------------------------------

@torch.library.custom_op("grpo_fast::sample", mutates_args=())
def _sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
            top_p: torch.Tensor, min_p: torch.Tensor, seeds: torch.Tensor,
            steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = native_for(logits, "sample")
    if n is None:
        return ref.sample(logits, temperature, top_k, top_p, min_p, seeds, steps)
    S, Vn = logits.shape
    tokens = torch.empty(S, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(S, dtype=torch.float32, device=logits.device)
    ws = n.sample_workspace(logits)  # CUDA: scratch for probabilities; CPU: None
    n.sample(tokens.data_ptr(), logprobs.data_ptr(), logits.data_ptr(), temperature.data_ptr(),
             top_k.data_ptr(), top_p.data_ptr(), min_p.data_ptr(), seeds.data_ptr(),
             steps.data_ptr(), S, Vn, *(() if ws is None else (ws.data_ptr(),)),
             *n.stream_args(logits))
    return tokens, logprobs


@_sample.register_fake
def _(logits, temperature, top_k, top_p, min_p, seeds, steps):
    S = logits.shape[0]
    return (logits.new_empty(S, dtype=torch.int64), logits.new_empty(S, dtype=torch.float32))


def sample(logits, temperature, top_k, top_p, min_p, seeds, steps):
    """Sample one token per row; returns (token_ids [S] int64, logprobs [S] fp32).

    logits [S, V] fp32; per-row temperature [S] fp32 (0 = greedy), top_k [S] int32 (0 = off),
    top_p [S] fp32 in (0, 1] (1 = off), min_p [S] fp32 in [0, 1] (0 = off), seeds [S] int64,
    steps [S] int64. Filters apply in the order top-k, top-p (over the renormalized top-k
    survivors), min-p (relative to the max probability); ties at a boundary are kept. The draw
    is inverse-CDF in vocabulary order over the survivors with u = uniform(seed, step), a
    counter-based hash, so a sequence's tokens depend only on its own (seed, step), not on the
    batch.

    Logprob semantics: log softmax(logits / T)[token] over the FULL vocabulary, i.e. the
    temperature-scaled distribution BEFORE top-k/top-p/min-p filtering: what the trainer
    computes from the same logits. Greedy rows (T = 0) report log softmax(logits)[token] (T = 1).
    """
    V.tensor("logits", logits, ndim=2, dtypes=(torch.float32,))
    S, dev = logits.shape[0], logits.device
    if logits.shape[1] == 0:
        raise ValueError("logits must have a non-empty vocabulary dim")
    V.tensor("temperature", temperature, ndim=1, dtypes=(torch.float32,), device=dev, shape=(S,))
    V.tensor("top_k", top_k, ndim=1, dtypes=_I32, device=dev, shape=(S,))
    V.tensor("top_p", top_p, ndim=1, dtypes=(torch.float32,), device=dev, shape=(S,))
    V.tensor("min_p", min_p, ndim=1, dtypes=(torch.float32,), device=dev, shape=(S,))
    V.tensor("seeds", seeds, ndim=1, dtypes=(torch.int64,), device=dev, shape=(S,))
    V.tensor("steps", steps, ndim=1, dtypes=(torch.int64,), device=dev, shape=(S,))
    if not torch.compiler.is_compiling() and dev.type == "cpu" and S > 0:
        if bool((temperature < 0).any()) or not bool(torch.isfinite(temperature).all()):
            raise ValueError("temperature must be finite and >= 0")
        if bool((top_k < 0).any()):
            raise ValueError("top_k must be >= 0 (0 = off)")
        if bool(((top_p <= 0) | (top_p > 1)).any()):
            raise ValueError("top_p must lie in (0, 1] (1 = off)")
        if bool(((min_p < 0) | (min_p > 1)).any()):
            raise ValueError("min_p must lie in [0, 1] (0 = off)")
    return _sample(logits, temperature, top_k, top_p, min_p, seeds, steps)
