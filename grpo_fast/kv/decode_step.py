"""One decode step's KV kernels for every layer, validated once per step.

A decode step runs append_kv and paged_decode_attention in each of L layers with the same slots,
block tables and context lengths. The public ops (grpo_fast.kv.ops) validate every argument and
go through torch's custom-op dispatch on each call: measured here ~120 µs (append_kv) and
~150 µs (attention) of overhead per call, against 4 µs and ~340 µs of kernel at 32 sequences:
~60 calls a step. ``DecodeStep`` checks the shared metadata once, checks each layer's tensors
with a few integer comparisons, and launches the native kernels directly (grpo_fast.kv.launch;
eager only: under torch.compile or without a native build it runs the public ops).

    step = DecodeStep(slot_mapping, block_tables, context_lens, scale, key_cache, num_q_heads)
    per layer:  step.append(key_cache, value_cache, k, v); out = step.attend(q, key_cache, value_cache)

With ``groups`` (a kv.cascade.CascadeGroups: rows that share a prompt's blocks) attend runs cascade
decode attention instead of the per-sequence paged kernel (same output to fp32 rounding).
"""

from __future__ import annotations

import torch

from grpo_fast import checks
from grpo_fast.native import native_for

from . import launch, ops


class DecodeStep:
    def __init__(self, slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 scale: float, key_cache: torch.Tensor, num_q_heads: int, groups=None):
        """slot_mapping [S] int32, block_tables [S, max_blocks] int32, context_lens [S] int32 on the
        cache's device; key_cache: one layer's cache [num_blocks, block_size, Hkv, D] (every layer's
        has this shape, dtype and device); groups: None, or the step's kv.cascade.CascadeGroups
        (numpy, moved to the device here)."""
        self.cache_shape = tuple(key_cache.shape)
        nb, bs, hkv, d = self.cache_shape
        dev, i32 = key_cache.device, (torch.int32,)
        ops.cache_pair(key_cache, key_cache)
        checks.tensor("slot_mapping", slot_mapping, ndim=1, dtypes=i32, device=dev)
        S = slot_mapping.shape[0]
        checks.tensor("block_tables", block_tables, dtypes=i32, device=dev, shape=(S, None))
        checks.tensor("context_lens", context_lens, dtypes=i32, device=dev, shape=(S,))
        if num_q_heads % hkv != 0:
            raise ValueError(f"num_q_heads ({num_q_heads}) is not a multiple of the cache's {hkv} kv heads")
        self.scale = checks.positive_float("scale", scale)
        self.slots, self.tables, self.lens = slot_mapping, block_tables, context_lens
        self.dtype, self.num_q_heads = key_cache.dtype, num_q_heads
        self.q_shape, self.kv_shape = (S, num_q_heads, d), (S, hkv, d)
        self.groups = None  # (group_rows [S], group_starts [G + 1], prefix_lens [G]) int32 on the device
        self.bounds = None  # (longest prefix, largest group): the CUDA kernel's grid, known here on the host
        if groups is not None:
            self.groups = tuple(torch.as_tensor(a).to(device=dev, dtype=torch.int32) for a in groups)
            checks.tensor("group_rows", self.groups[0], shape=(S,))
            checks.tensor("group_starts", self.groups[1], shape=(self.groups[2].shape[0] + 1,))
            starts = [int(x) for x in groups[1]]
            self.bounds = (max((int(x) for x in groups[2]), default=0),
                           max((b - a for a, b in zip(starts, starts[1:])), default=0))
        self.native = None if torch.compiler.is_compiling() else native_for(key_cache, "paged_decode_attention")
        if self.native is not None and dev.type == "cpu" and S > 0:  # the check each op would repeat
            if int(context_lens.max()) > block_tables.shape[1] * bs or int(context_lens.min()) < 0:
                raise ValueError("context_lens must lie in [0, block_tables.shape[1] * block_size]")

    def _check_caches(self, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
        checks.exact("key_cache", key_cache, self.cache_shape, self.dtype)
        checks.exact("value_cache", value_cache, self.cache_shape, self.dtype)

    def append(self, key_cache: torch.Tensor, value_cache: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor) -> None:
        """cache.view(-1, Hkv, D)[slot[s]] = key[s] (and value) for this step's S tokens."""
        if self.native is None:
            return ops.append_kv(key_cache, value_cache, key, value, self.slots)
        self._check_caches(key_cache, value_cache)
        checks.exact("key", key, self.kv_shape, self.dtype)
        checks.exact("value", value, self.kv_shape, self.dtype)
        launch.append_kv(self.native, key_cache, value_cache, key, value, self.slots)

    def attend(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> torch.Tensor:
        """paged_decode_attention(query [S, Hq, D], caches, this step's tables and lengths), as a
        cascade over the step's groups when it has some."""
        if self.native is None:
            if self.groups is not None:
                return ops.cascade_decode_attention(query, key_cache, value_cache, self.tables, self.lens, self.scale,
                                                    *self.groups)
            return ops.paged_decode_attention(query, key_cache, value_cache, self.tables, self.lens, self.scale)
        self._check_caches(key_cache, value_cache)
        checks.exact("query", query, self.q_shape, self.dtype)
        if self.groups is not None:
            return launch.cascade_decode_attention(self.native, query, key_cache, value_cache, self.tables, self.lens,
                                                   self.scale, *self.groups, bounds=self.bounds)
        return launch.paged_decode_attention(self.native, query, key_cache, value_cache, self.tables, self.lens,
                                             self.scale)
