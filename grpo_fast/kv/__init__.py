"""Paged KV cache: block manager with per-group prefix sharing, and the kernels that use it.

Cache layout per layer: key_cache, value_cache [num_blocks, block_size, num_kv_heads, head_dim];
token slot = block * block_size + offset. One GRPO generation, per layer where it says so:

    bm = BlockManager(num_blocks, block_size=16)
    cached = bm.allocate(pid, prompt_ids)                 # prompt slots; first `cached` have KV
    slots = bm.slot_mapping(pid, cached, len(prompt_ids))
    k, v = ...forward over prompt_ids[cached:]...         # per layer: [T, Hkv, D]
    (prefix hit: gather_kv(kc, vc, bm.slot_mapping(pid, 0, cached)) in front of k, v, and
     prefill_attention(q, k_all, v_all, cu_q, scale, cu_seqlens_k=cu_k))
    prefill_attention(q, k, v, cu_seqlens, scale); append_kv(kc, vc, k, v, slots)
    bm.fork(pid, child_ids); bm.free(pid)                 # G children share every block
    loop:  pairs = bm.append_token(child)                 # reserve the next slot (CoW pairs)
           copy_blocks(kc, vc, pairs)                     # per layer, BEFORE writing
           slot, tables, lens = bm.decode_metadata(children)
           append_kv(kc, vc, k_new, v_new, slot)          # per layer
           paged_decode_attention(q, kc, vc, tables, lens, scale)
           (or, when the G children share a long prompt: groups = cascade_groups(tables, lens,
            group_ids, block_size, min_prefix) and cascade_decode_attention(..., *groups))
           (the sampler then draws each sequence's next token: grpo_fast.sampler.sample)
    bm.free(child) when done; OutOfBlocksError -> preempt (free, recompute later);
    bm.reset_prefix_cache() after every weight update (cached KV is stale).

All kernels validate their tensors (ValueError naming the argument) and are registered as
torch.ops.grpo_fast.*; `grpo_fast.kv.reference` holds the plain-PyTorch oracle versions.
"""
from . import reference
from .block_manager import BlockManager, NativeBlockManager, PyBlockManager
from .errors import OutOfBlocksError
from .cascade import CascadeGroups, cascade_groups
from .ops import (append_kv, cascade_decode_attention, copy_blocks, gather_kv, paged_decode_attention,
                  prefill_attention)

__all__ = [
    "BlockManager", "NativeBlockManager", "PyBlockManager", "OutOfBlocksError", "append_kv",
    "cascade_decode_attention", "CascadeGroups", "cascade_groups", "copy_blocks", "gather_kv",
    "paged_decode_attention", "prefill_attention", "reference",
]


def __getattr__(name):
    # Token sampling moved to the sampler (grpo_fast.sampler.sample); the old name keeps working.
    if name == "sample":
        import warnings

        from grpo_fast.sampler.sampling_op import sample

        warnings.warn("grpo_fast.kv.sample moved to grpo_fast.sampler.sample", DeprecationWarning, stacklevel=2)
        return sample
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
