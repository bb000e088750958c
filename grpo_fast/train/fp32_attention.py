"""HF SDPA attention over half-precision CPU tensors, computed in fp32, in the training forward.

torch's CPU flash-attention kernel in bf16 is slower than in fp32, where the arithmetic is the
same (it accumulates in fp32 either way) and only the loads are wider: measured in the training
pass of SmolLM2 + LoRA, bf16, 4 x 8 rows of 128 completion tokens (benchmarks/RESULTS.md, "bf16
on the CPU"), its backward took 1.50 s a step in bf16 and 0.77 s with q, k, v cast to fp32 and
the output cast back, the casts included. The result is at least as precise (the kernel's own
softmax and P.V sums are fp32 in both; here q, k and v are not rounded to bf16 inside it either).

`fp32_cpu_attention()` routes the "sdpa" entry of transformers' attention registry through the
cast while a forward runs (the registry's per-process override, removed on exit; a user's own
override of "sdpa" is kept and wrapped). Not under gradient checkpointing: its recompute runs in
the backward, outside the context, and must compute what the forward did.
"""

from __future__ import annotations

import contextlib

import torch

_HALF = (torch.bfloat16, torch.float16)


def in_fp32(attention):
    """attention(module, q, k, v, mask, **kw) with half-precision CPU q, k, v (and a floating mask)
    cast to fp32, and its output cast back; anything else passed through."""

    def wrapped(module, query, key, value, attention_mask, *args, **kwargs):
        if query.device.type != "cpu" or query.dtype not in _HALF:
            return attention(module, query, key, value, attention_mask, *args, **kwargs)
        mask = attention_mask
        if mask is not None and mask.is_floating_point():
            mask = mask.float()  # an additive mask: its dtype's min stays far below any score
        out, weights = attention(module, query.float(), key.float(), value.float(), mask, *args, **kwargs)
        return out.to(query.dtype), weights

    wrapped.__wrapped__ = attention
    return wrapped


@contextlib.contextmanager
def sdpa_wrapped(wrap, enabled: bool = True):
    """Within: transformers' "sdpa" attention is wrap(the attention it was), through the registry's
    per-process override (removed on exit; a user's own override of "sdpa" is kept and wrapped).
    Yields whether it is on. Calls nest; each restores what it found."""
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as registry
    except ImportError:
        registry = None
    if registry is None or not hasattr(registry, "_local_mapping") or not enabled or "sdpa" not in registry:
        yield False
        return
    own = registry._local_mapping.get("sdpa")  # a user's per-process override, if any
    registry["sdpa"] = wrap(registry["sdpa"])
    try:
        yield True
    finally:
        if own is None:
            del registry["sdpa"]
        else:
            registry["sdpa"] = own


@contextlib.contextmanager
def fp32_cpu_attention(enabled: bool = True):
    """Within: HF's "sdpa" attention over bf16 / fp16 CPU tensors computes in fp32. Yields whether
    it is on. Calls nest; each restores what it found."""
    with sdpa_wrapped(in_fp32, enabled) as on:
        yield on
