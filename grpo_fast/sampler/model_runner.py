"""Runs the live model over paged KV: batched prefill of prompts, one-token decode of all sequences.

The model's own modules do everything but attention (see grpo_fast.models.llama_family); here
attention reads and writes the per-layer block caches ``[num_blocks, block_size, Hkv, D]``:

- prefill: K/V of the new tokens are written at their slots, and attention runs over the
  contiguous prompt (causal varlen over all prompts of the batch: flash-attn's kernel on CUDA
  fp16/bf16 when flash-attn is installed, kv.prefill_attention otherwise). A prompt whose first tokens
  were found in the prefix cache computes only its suffix, attending over its whole K/V read
  back from the blocks (bottom-right-aligned causal mask).
- decode: one token per sequence; its K/V are appended, then paged decode attention reads the
  sequence's blocks through its block table (kv.decode_step: metadata validated once per step,
  kernels called directly). When the G sequences of a group still share a prompt of at least
  ``cascade_min_prefix`` tokens, cascade attention reads that prefix once for the whole group
  (kv.cascade). fp32 CPU models, plain or LoRA-wrapped, run the decoder stack of a decode step as
  one native call (grpo_fast.models.native_decode).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from grpo_fast import kv
from grpo_fast.kv.cascade import cascade_groups, cpu_min_prefix
from grpo_fast.kv.decode_step import DecodeStep
from grpo_fast.models import native_decode
from grpo_fast.models.llama_family import LlamaFamily
from grpo_fast.native import has_native, openmp_regions
from grpo_fast.sampler.decode_graphs import DecodeGraphs

try:  # optional (extra "gpu"): CUDA fp16/bf16 prefill through flash-attn's varlen kernel
    from flash_attn import flash_attn_varlen_func as _flash_varlen
except ImportError:
    _flash_varlen = None


def default_cascade_min_prefix(device: torch.device, dtype: torch.dtype | None = None) -> int | None:
    """Shortest shared prefix (tokens) at which a group's decode attention runs as a cascade:
    measured on the CPU (kv.cascade.cpu_min_prefix: CPU_MIN_PREFIX, or CPU_MIN_PREFIX_BF16_DOT for
    a bf16 cache where the CPU has AVX512-BF16, CPU_MIN_PREFIX_AVX512 for fp32 where it has
    AVX-512); None (never) on CUDA until a GPU run has measured
    where it pays. GRPO_FAST_CASCADE_MIN_PREFIX=N overrides it (N < 0: never)."""
    env = os.environ.get("GRPO_FAST_CASCADE_MIN_PREFIX")
    if env is not None:
        n = int(env)
        return None if n < 0 else n
    return cpu_min_prefix(dtype) if device.type == "cpu" else None


class ModelRunner:
    def __init__(self, model: torch.nn.Module, *, num_blocks: int, block_size: int, cuda_graphs: bool = False,
                 cascade: bool = True):
        self.family = LlamaFamily(model)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = self.family.device
        self.dtype = self.family.dtype
        self._kv_cache: torch.Tensor | None = None  # allocated on first use, see release()
        self.graphs = DecodeGraphs(self) if cuda_graphs else None
        # None: every step runs the per-sequence paged kernel
        ok = cascade and has_native("cascade_decode_attention", self.device.type)
        self.cascade_min_prefix = default_cascade_min_prefix(self.device, self.dtype) if ok else None

    @contextmanager
    def generate_call(self):
        """What lasts one generate call: the decode fast paths remember each module's path facts
        (adapters may be toggled between calls), and recorded CUDA graphs end with it."""
        try:
            with self.family.fast.scope():
                yield
        finally:
            if self.graphs is not None:
                self.graphs.clear()

    @property
    def kv_cache(self) -> torch.Tensor:
        """One allocation for all layers: [L, 2, num_blocks, block_size, Hkv, D], each [l, 0|1]
        contiguous. Allocated on first use (again after release())."""
        if self._kv_cache is None:
            s = self.family.shape
            self._kv_cache = torch.empty(s.num_layers, 2, self.num_blocks, self.block_size, s.num_kv_heads,
                                         s.head_dim, dtype=self.dtype, device=self.device)
        return self._kv_cache

    def release(self) -> None:
        """Free the KV cache (between generate calls nothing lives in it); the next call
        allocates it again. Lets a trainer give the memory to its training pass."""
        if self.graphs is not None:
            self.graphs.clear()  # they hold the cache's addresses
        self._kv_cache = None

    @staticmethod
    def bytes_per_block(model: torch.nn.Module, block_size: int) -> int:
        return _block_bytes(LlamaFamily(model), block_size)

    @property
    def kv_bytes(self) -> int:
        return self.num_blocks * _block_bytes(self.family, self.block_size)

    def _caches(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv_cache[layer, 0], self.kv_cache[layer, 1]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate shared blocks into the fresh ones before they are written."""
        if not pairs:
            return
        mapping = torch.tensor(pairs, dtype=torch.int64, device=self.device)  # [M, 2]
        for layer in range(self.family.shape.num_layers):
            kv.copy_blocks(*self._caches(layer), mapping)

    def prefill(self, bm, items: list[tuple[int, list[int], int]]) -> torch.Tensor:
        """Logits ``[B, V]`` (fp32) at the last token of each (seq_id, token_ids, num_cached).

        The block manager already holds each sequence's blocks; the tokens from ``num_cached`` on
        are computed and their K/V written. A fully cached prompt still recomputes its last token
        (for its logits) but does not rewrite that token's (shared) slot.
        """
        dev = self.device
        ids, pos, slots, cu_q, cu_k = [], [], [], [0], [0]
        prefix_hits = []  # (item index, slots of the whole sequence) for prompts with cached heads
        for i, (seq_id, tokens, num_cached) in enumerate(items):
            start = min(num_cached, len(tokens) - 1)
            ids.extend(tokens[start:])
            pos.extend(range(start, len(tokens)))
            slots.append(torch.full((num_cached - start,), -1, dtype=torch.int32))  # -1: not written
            slots.append(torch.as_tensor(bm.slot_mapping(seq_id, num_cached, len(tokens))).to(torch.int32))
            cu_q.append(cu_q[-1] + len(tokens) - start)
            cu_k.append(cu_k[-1] + len(tokens))
            if start > 0:
                prefix_hits.append((i, torch.as_tensor(bm.slot_mapping(seq_id, 0, len(tokens))).to(dev, torch.int32)))
        input_ids = torch.tensor(ids, dtype=torch.int64, device=dev)  # [T]
        positions = torch.tensor(pos, dtype=torch.int64, device=dev)  # [T]
        slot_mapping = torch.cat(slots).to(dev)  # [T] int32
        cu_seqlens = torch.tensor(cu_q, dtype=torch.int32, device=dev)  # [B+1]
        cu_seqlens_k = torch.tensor(cu_k, dtype=torch.int32, device=dev) if prefix_hits else None
        scale = self.family.shape.scale
        max_q, max_k = max(_diff(cu_q)), max(_diff(cu_k))

        def attend(layer, q, k, v):  # q [T, Hq, D], k/v [T, Hkv, D]
            key_cache, value_cache = self._caches(layer)
            q, k, v = q.to(self.dtype), k.to(self.dtype), v.to(self.dtype)  # a norm may have upcast
            kv.append_kv(key_cache, value_cache, k, v, slot_mapping)
            if prefix_hits:
                # Keys of a prompt with a cached head = its whole sequence, read back from the blocks.
                k_parts, v_parts = list(k.split(_diff(cu_q))), list(v.split(_diff(cu_q)))
                for i, seq_slots in prefix_hits:
                    k_parts[i], v_parts[i] = kv.gather_kv(key_cache, value_cache, seq_slots)  # [L_i, Hkv, D]
                k, v = torch.cat(k_parts), torch.cat(v_parts)  # [Tk, Hkv, D]
            if _flash_varlen is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
                cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
                return _flash_varlen(q, k, v, cu_seqlens, cu_k, max_q, max_k, softmax_scale=scale, causal=True)
            return kv.prefill_attention(q.contiguous(), k, v, cu_seqlens, scale, cu_seqlens_k)

        last = torch.tensor(cu_q[1:], dtype=torch.int64, device=dev) - 1  # [B]
        with openmp_regions(dev.type == "cpu"):  # torch ops between our kernels: share libgomp's team
            return self.family.forward(input_ids, positions, attend, logits_index=last)

    def decode(self, bm, seq_ids: list[int], last_tokens: list[int], group_ids: list[int] | None = None
               ) -> torch.Tensor:
        """Logits ``[S, V]`` (fp32) after feeding each sequence its pending last token, whose
        slot the block manager has already reserved. group_ids [S]: the prompt group of each
        sequence (rows of a group may share their prompt's blocks: cascade attention). With CUDA
        graphs on (see decode_graphs) a captured step is replayed and the logits are a view of its
        static output, valid until the next decode call."""
        slot_np, tables_np, lens_np = bm.decode_metadata(seq_ids)
        if self.graphs is not None:
            logits = self.graphs.run(slot_np, tables_np, lens_np, last_tokens)
            if logits is not None:
                return logits
        groups = None
        if group_ids is not None and self.cascade_min_prefix is not None:
            groups = cascade_groups(tables_np, lens_np, group_ids, self.block_size, self.cascade_min_prefix)
        dev = self.device
        slots = torch.as_tensor(slot_np).to(device=dev, dtype=torch.int32)  # [S]
        block_tables = torch.as_tensor(tables_np).to(device=dev, dtype=torch.int32)  # [S, max_blocks]
        context_lens = torch.as_tensor(lens_np).to(device=dev, dtype=torch.int32)  # [S]
        input_ids = torch.tensor(last_tokens, dtype=torch.int64, device=dev)  # [S]
        return self.decode_forward(input_ids, slots, block_tables, context_lens, groups)

    def decode_forward(self, input_ids: torch.Tensor, slots: torch.Tensor, block_tables: torch.Tensor,
                       context_lens: torch.Tensor, groups: kv.CascadeGroups | None = None) -> torch.Tensor:
        """The decode step on device tensors: input_ids [S] int64, slots [S], block_tables
        [S, max_blocks], context_lens [S] int32 (a padding row: slot -1, context length 0);
        groups: the step's cascade groups, or None. No host synchronization on CUDA, so it can be
        captured in a CUDA graph (without groups: the graphs replay per-sequence attention)."""
        positions = (context_lens.to(torch.int64) - 1).clamp_(min=0)  # [S]
        step = DecodeStep(slots, block_tables, context_lens, self.family.shape.scale, self._caches(0)[0],
                          self.family.shape.num_q_heads, groups)

        layers = native_decode.native_layers(self.family)
        if layers is not None and layers.accepts(input_ids.shape[0]):
            return native_decode.decode_forward(self.family, layers, input_ids, positions, step, self.kv_cache)

        def attend(layer, q, k, v):  # q [S, Hq, D], k/v [S, Hkv, D]
            key_cache, value_cache = self._caches(layer)
            q, k, v = q.to(self.dtype), k.to(self.dtype), v.to(self.dtype)
            step.append(key_cache, value_cache, k, v)
            return step.attend(q.contiguous(), key_cache, value_cache)

        with openmp_regions(self.device.type == "cpu"):  # torch ops between our kernels: share libgomp's team
            return self.family.forward(input_ids, positions, attend)


def _block_bytes(family: LlamaFamily, block_size: int) -> int:
    """Bytes of one KV block over all layers: K and V, [block_size, Hkv, D] each."""
    s = family.shape
    itemsize = torch.empty((), dtype=family.dtype).element_size()
    return 2 * s.num_layers * block_size * s.num_kv_heads * s.head_dim * itemsize


def _diff(cu: list[int]) -> list[int]:
    return [b - a for a, b in zip(cu, cu[1:])]
