"""One decode step's KV kernels for every layer, validated once per step.

A decode step runs append_kv and paged_decode_attention in each of L layers with the same slots,
block tables and context lengths. The public ops (grpo_fast.kv.ops) validate every argument and
go through torch's custom-op dispatch on each call: measured here ~120 µs (append_kv) and
~150 µs (attention) of overhead per call, against 4 µs and ~340 µs of kernel at 32 sequences:
~60 calls a step. ``DecodeStep`` checks the shared metadata once, checks each layer's tensors
with a few integer comparisons, and calls the native kernels directly (eager only; under
torch.compile or without a native build it runs the public ops).

    step = DecodeStep(slots, block_tables, context_lens, scale, cache_shape, dtype, num_q_heads)
    per layer:  step.append(key_cache, value_cache, k, v); out = step.attend(q, key_cache, value_cache)
"""

from __future__ import annotations

import torch

from . import _validate as V
from . import ops
from ._native import dtype_code, native_for


class DecodeStep:
    def __init__(self, slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 scale: float, key_cache: torch.Tensor, num_q_heads: int):
        """slot_mapping [S] int32, block_tables [S, max_blocks] int32, context_lens [S] int32 on the
        cache's device; key_cache: one layer's cache [num_blocks, block_size, Hkv, D] (every layer's
        has this shape, dtype and device)."""
        self.cache_shape = tuple(key_cache.shape)
        nb, bs, hkv, d = self.cache_shape
        dev, i32 = key_cache.device, (torch.int32,)
        V.cache_pair(key_cache, key_cache)
        V.tensor("slot_mapping", slot_mapping, ndim=1, dtypes=i32, device=dev)
        S = slot_mapping.shape[0]
        V.tensor("block_tables", block_tables, ndim=2, dtypes=i32, device=dev, shape=(S, None))
        V.tensor("context_lens", context_lens, ndim=1, dtypes=i32, device=dev, shape=(S,))
        if num_q_heads % hkv != 0:
            raise ValueError(f"num_q_heads ({num_q_heads}) is not a multiple of the cache's {hkv} kv heads")
        self.scale = V.scalar_float("scale", scale)
        self.slots, self.tables, self.lens = slot_mapping, block_tables, context_lens
        self.dtype, self.num_q_heads = key_cache.dtype, num_q_heads
        self.q_shape, self.kv_shape = (S, num_q_heads, d), (S, hkv, d)
        self.native = None if torch.compiler.is_compiling() else native_for(key_cache, "paged_decode_attention")
        if self.native is not None and dev.type == "cpu" and S > 0:  # the check each op would repeat
            if int(context_lens.max()) > block_tables.shape[1] * bs or int(context_lens.min()) < 0:
                raise ValueError("context_lens must lie in [0, block_tables.shape[1] * block_size]")
        self._stream = self.native.stream_args(key_cache) if self.native is not None else ()

    def _check(self, name: str, t: torch.Tensor, shape: tuple) -> None:
        if tuple(t.shape) != shape or t.dtype != self.dtype or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous {self.dtype} tensor of shape {shape}, "
                             f"got {t.dtype} {tuple(t.shape)}")

    def _check_caches(self, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
        for name, c in (("key_cache", key_cache), ("value_cache", value_cache)):
            if tuple(c.shape) != self.cache_shape or c.dtype != self.dtype or not c.is_contiguous():
                raise ValueError(f"{name}: expected a contiguous {self.dtype} cache of shape {self.cache_shape}")

    def append(self, key_cache: torch.Tensor, value_cache: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor) -> None:
        """cache.view(-1, Hkv, D)[slot[s]] = key[s] (and value) for this step's S tokens."""
        if self.native is None:
            return ops.append_kv(key_cache, value_cache, key, value, self.slots)
        self._check_caches(key_cache, value_cache)
        self._check("key", key, self.kv_shape)
        self._check("value", value, self.kv_shape)
        nb, bs, h, d = self.cache_shape
        self.native.append_kv(key_cache.data_ptr(), value_cache.data_ptr(), key.data_ptr(), value.data_ptr(),
                              self.slots.data_ptr(), key.shape[0], nb * bs, h, d, dtype_code(key_cache),
                              *self._stream)

    def attend(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> torch.Tensor:
        """paged_decode_attention(query [S, Hq, D], caches, this step's tables and lengths)."""
        if self.native is None:
            return ops.paged_decode_attention(query, key_cache, value_cache, self.tables, self.lens, self.scale)
        self._check_caches(key_cache, value_cache)
        self._check("query", query, self.q_shape)
        nb, bs, hkv, d = self.cache_shape
        out = torch.empty_like(query)
        self.native.paged_decode_attention(out.data_ptr(), query.data_ptr(), key_cache.data_ptr(),
                                           value_cache.data_ptr(), self.tables.data_ptr(), self.lens.data_ptr(),
                                           query.shape[0], self.num_q_heads, hkv, d, bs, self.tables.shape[1],
                                           nb, self.scale, dtype_code(query), *self._stream)
        return out
