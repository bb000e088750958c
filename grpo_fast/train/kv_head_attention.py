"""Attention on the K/V heads where completions attend over a cached prompt, on the CPU.

HF's SDPA path (transformers.integrations.sdpa_attention) asks `use_gqa_in_sdpa` whether to let
SDPA read K/V at their own heads (`enable_gqa=True`); with an attention mask it says no, because
CUDA's fused kernels would fall back to the math kernel, and it repeats K and V to every query
head instead. In the cached and group-prompts layouts (packed_forward.completions_over_prefix)
each row attends over its own copy of its prompt's K/V under a mask, and autograd saves those
copies repeated: for SmolLM2 (9 query / 3 K/V heads) 3x their size. torch's CPU kernel takes a
mask and enable_gqa together and gives the same output (tests/test_kv_head_attention.py), there
faster too (benchmarks/bench_sdpa_kv_heads.py, one SmolLM2 layer forward + backward, 8 rows x 63
queries over 575 keys: 20-26 vs 33-37 ms, and 23 MiB less saved). Not in the packed layout: one
long sequence under a T x T mask ran slower with it (1,056 x 1,056: 77-94 vs 69-80 ms), for 3 MiB
less saved.

`kv_head_attention()` answers yes for CPU tensors while a forward runs, by swapping the module's
`use_gqa_in_sdpa` for the duration of the call (sdpa_attention_forward looks it up at each call,
in every transformers version we support). Not under gradient checkpointing: its recompute runs
in the backward, outside the context, and must save the same tensors as the forward did. The
memory plan counts those K/V at their own heads on the CPU (grpo_fast/memory.py,
`_cached_layout_kv_per_layer`).
"""

from __future__ import annotations

import contextlib


def _sdpa_module():
    try:
        from transformers.integrations import sdpa_attention
    except ImportError:  # an older transformers: nothing to swap
        return None
    return sdpa_attention if hasattr(sdpa_attention, "use_gqa_in_sdpa") else None


@contextlib.contextmanager
def kv_head_attention(enabled: bool = True):
    """Within: HF SDPA attention on CPU tensors takes K/V at their own heads (enable_gqa), masks
    included. Yields whether it is on (off: not enabled, which the caller says under gradient
    checkpointing, or a transformers without the hook). Calls nest; each restores what it found."""
    module = _sdpa_module()
    if module is None or not enabled:
        yield False
        return
    original = module.use_gqa_in_sdpa

    def on_cpu(attention_mask, key, *rest):  # (mask, key) in transformers 4.x, (mask, key, value) in 5.x
        return key.device.type == "cpu" or original(attention_mask, key, *rest)

    module.use_gqa_in_sdpa = on_cpu
    try:
        yield True
    finally:
        module.use_gqa_in_sdpa = original
