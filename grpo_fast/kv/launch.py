"""One launcher per native KV kernel: raw pointers, sizes and the dtype code out of checked
tensors, in the order csrc/kv_cpu.h and csrc/cuda/kv_cuda.h declare them.

Both callers go through here: the public ops (grpo_fast.kv.ops, once their arguments are
validated) and a decode step's per-layer calls (grpo_fast.kv.decode_step, metadata validated
once per step). `backend` is grpo_fast.native.native_for(tensor, op).
"""
from __future__ import annotations

import torch

from grpo_fast.native import Backend, dtype_code


def append_kv(backend: Backend, key_cache: torch.Tensor, value_cache: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """cache.view(-1, Hkv, D)[slot[t]] = key[t] (and value), slot -1 skipped."""
    nb, bs, h, d = key_cache.shape
    backend.append_kv(key_cache.data_ptr(), value_cache.data_ptr(), key.data_ptr(), value.data_ptr(),
                      slot_mapping.data_ptr(), key.shape[0], nb * bs, h, d, dtype_code(key_cache),
                      *backend.stream_args(key_cache))


def copy_blocks(backend: Backend, key_cache: torch.Tensor, value_cache: torch.Tensor,
                block_mapping: torch.Tensor) -> None:
    """cache[dst] = cache[src] for each (src, dst) row of block_mapping [M, 2] int64."""
    nb, bs, h, d = key_cache.shape
    backend.copy_blocks(key_cache.data_ptr(), value_cache.data_ptr(), block_mapping.data_ptr(),
                        block_mapping.shape[0], nb, bs * h * d, dtype_code(key_cache),
                        *backend.stream_args(key_cache))


def paged_decode_attention(backend: Backend, query: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """out [S, Hq, D] of one query per sequence over its paged K/V."""
    S, hq, d = query.shape
    nb, bs, hkv, _ = key_cache.shape
    out = torch.empty_like(query)
    backend.paged_decode_attention(out.data_ptr(), query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
                                   block_tables.data_ptr(), context_lens.data_ptr(), S, hq, hkv, d, bs,
                                   block_tables.shape[1], nb, float(scale), dtype_code(query),
                                   *backend.stream_args(query))
    return out


def cascade_decode_attention(backend: Backend, query: torch.Tensor, key_cache: torch.Tensor,
                             value_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                             scale: float, group_rows: torch.Tensor, group_starts: torch.Tensor,
                             prefix_lens: torch.Tensor, bounds: tuple[int, int] | None = None) -> torch.Tensor:
    """out [S, Hq, D]: paged decode attention with each group's shared prefix attended once.
    bounds: (longest prefix, largest group), which the CUDA kernel sizes its grid by; read back
    from the device (a sync) when not given."""
    S, hq, d = query.shape
    nb, bs, hkv, _ = key_cache.shape
    out = torch.empty_like(query)
    extra = ()
    if backend.cuda:
        if bounds is None:
            sizes = group_starts[1:] - group_starts[:-1]
            bounds = (int(prefix_lens.max()) if prefix_lens.numel() else 0, int(sizes.max()) if sizes.numel() else 0)
        floats = backend.cascade_workspace_floats(S, hq, d, prefix_lens.shape[0], *bounds)
        workspace = torch.empty(max(1, floats), dtype=torch.float32, device=query.device)
        extra = (*bounds, workspace.data_ptr(), floats)
    backend.cascade_decode_attention(out.data_ptr(), query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
                                     block_tables.data_ptr(), context_lens.data_ptr(), S, hq, hkv, d, bs,
                                     block_tables.shape[1], nb, float(scale), dtype_code(query),
                                     group_rows.data_ptr(), group_starts.data_ptr(), prefix_lens.data_ptr(),
                                     prefix_lens.shape[0], *extra, *backend.stream_args(query))
    return out


def prefill_attention(backend: Backend, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      cu_seqlens: torch.Tensor, cu_seqlens_k: torch.Tensor, scale: float) -> torch.Tensor:
    """out [T, Hq, D] of causal varlen attention (bottom-right aligned)."""
    T, hq, d = query.shape
    out = torch.empty_like(query)
    backend.prefill_attention(out.data_ptr(), query.data_ptr(), key.data_ptr(), value.data_ptr(),
                              cu_seqlens.data_ptr(), cu_seqlens_k.data_ptr(), cu_seqlens.shape[0] - 1, T, hq,
                              key.shape[1], d, float(scale), dtype_code(query), *backend.stream_args(query))
    return out
