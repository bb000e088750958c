"""The training pass's attention on the CPU as one native op, forward and backward.

torch's CPU flash attention ran the training pass's attention at 50-130 GFLOPS on this project's
machine: in the fp32 GRPO step at 1,024-token prompts its forward and backward were 14.3 s of the
35 s training pass (torch.profiler; benchmarks/RESULTS.md, "Queries in the vector lanes", item
4). csrc/train_attention_item.inc computes the same attention with the cascade's query-lane
tiles: a work item is one (batch row, kv head), whose rep query heads x a block of tokens are the
vector lanes of one small GEMM per chunk of keys; the backward is flash attention's (P recomputed
from the saved log-sum-exp):

    out = softmax(scale q k^T + mask) v                         q [B, Hq, T, D], k, v [B, Hkv, S, D]
    dS = P (dO v^T - rowsum(dO o out)),  dq = scale dS k,  dk = scale dS^T q,  dv = P^T dO

in fp32, K/V at their own heads (GQA without repeating them), masks as a [B or 1, 1, T, S] keep
mask (HF's boolean masks, or additive ones of 0 and a large negative value), or causal.

`native_cpu_attention()` routes HF's "sdpa" attention through it while a forward runs, where it
applies (fp32 CPU tensors, at least MIN_KEYS keys, no dropout, D % 8 == 0, the native build,
GRPO_FAST_NO_CPU_TRAIN_ATTENTION not 1; anything else goes to the attention it wraps). Enter it
outside fp32_attention's context: that one casts bf16 to fp32 first, then calls this. Not under
gradient checkpointing, like the other two swaps: the recompute runs outside the context.
"""

from __future__ import annotations

import contextlib
import os

import torch

from grpo_fast.native import _C
from grpo_fast.train.fp32_attention import sdpa_wrapped

SWITCH_OFF = "GRPO_FAST_NO_CPU_TRAIN_ATTENTION"
# Keys per query row from which the op runs (below: SDPA). Per call it is 2.1x SDPA already at 174
# keys, but there the attention is a small part of the pass: the pass (4 x 8 x 128, cached layout,
# alternating) read 1.02x at 40-token prompts (~170 keys), 1.06x at 256 (~380), 1.30x at 1,024
# (~1,150). Below the threshold the default job keeps SDPA's numbers: with the op, its seed-0
# run took another trajectory (the same gradients to 3 digits over the first steps, then
# diverging as RL runs do) and ended at 26% eval accuracy against 61% (seed 1: 63% both ways).
MIN_KEYS = 256


def available() -> bool:
    """The native build has the op, the CPU runs it (AVX2), and the switch is not set."""
    return (_C is not None and hasattr(_C, "cpu_train_attention_runs") and _C.cpu_train_attention_runs()
            and os.environ.get(SWITCH_OFF) != "1")


def _keep_args(keep: torch.Tensor | None) -> tuple[int, int]:
    """The kernel's (pointer, batch stride) of a [Bm, T, S] keep mask; (0, 0) without one, stride 0
    where one mask serves every batch row."""
    if keep is None:
        return 0, 0
    return keep.data_ptr(), keep.stride(0) if keep.shape[0] > 1 else 0


class TrainAttention(torch.autograd.Function):
    """out [B, Hq, T, D] of q [B, Hq, T, D], k, v [B, Hkv, S, D] (fp32 CPU), keep: a uint8 [Bm, T, S]
    mask (Bm = B or 1) or None; causal (keep None, T == S): token i attends keys j <= i."""

    @staticmethod
    def forward(ctx, q, k, v, keep, causal: bool, scale: float):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, Hq, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        out = torch.empty_like(q)  # [B, Hq, T, D]
        lse = torch.empty(B, Hq, T, dtype=torch.float32)
        keep_ptr, keep_bstride = _keep_args(keep)
        _C.cpu_train_attention_forward(out.data_ptr(), lse.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                       keep_ptr, keep_bstride, causal, B, Hq, Hkv, T, S, D, scale)
        ctx.save_for_backward(q, k, v, out, lse, keep)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, keep = ctx.saved_tensors
        dout = dout.contiguous()
        B, Hq, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        keep_ptr, keep_bstride = _keep_args(keep)
        _C.cpu_train_attention_backward(dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), out.data_ptr(), lse.data_ptr(),
                                        dout.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), keep_ptr,
                                        keep_bstride, ctx.causal, B, Hq, Hkv, T, S, D, ctx.scale)
        return dq, dk, dv, None, None, None


def keep_mask(mask: torch.Tensor, B: int, T: int, S: int) -> torch.Tensor | None:
    """A [B or 1, 1, T, S] attention mask (bool: True = attend; floating: additive, 0 = attend) as a
    contiguous uint8 [B or 1, T, S] keep mask; None where it is something else (per-head masks,
    additive values other than 0 and a large negative one: a bias this op does not add)."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, B) or tuple(mask.shape[2:]) != (T, S):
        return None
    m = mask[:, 0]
    if m.dtype == torch.bool:
        return m.to(torch.uint8).contiguous()
    if not m.is_floating_point():
        return None
    keep = m == 0
    if not bool((keep | (m <= torch.finfo(m.dtype).min / 2)).all()):  # -inf included
        return None
    return keep.to(torch.uint8).contiguous()


def with_native_attention(attention):
    """HF's attention(module, q, k, v, mask, dropout=, scaling=, is_causal=, **kw) -> (out [B, T, Hq,
    D], None), computed by TrainAttention where it applies, else by `attention` itself."""

    last = []  # (mask, its version, keep): every layer of a forward gets the same mask tensor,
    # converted once (and saved once); held here, so its memory cannot be another mask's meanwhile

    def keep_of(mask, B, T, S):
        if not last or last[0][0] is not mask or last[0][1] != mask._version:
            last[:] = [(mask, mask._version, keep_mask(mask, B, T, S))]
        return last[0][2]

    def wrapped(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                **kwargs):
        def fallback():
            return attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                             is_causal=is_causal, **kwargs)

        if (query.device.type != "cpu" or query.dtype != torch.float32 or key.dtype != torch.float32
                or (dropout and module.training) or query.shape[-1] % 8 or query.shape[1] % key.shape[1]
                or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
                or kwargs.get("output_attentions") or not available()):
            return fallback()
        B, _, T, _ = query.shape
        S = key.shape[2]
        if S < MIN_KEYS:
            return fallback()
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(T > 1 and attention_mask is None and causal)  # as HF's sdpa decides it
        keep = None
        if attention_mask is not None:
            keep = keep_of(attention_mask, B, T, S)
            if keep is None:
                return fallback()
        elif causal and S != T:
            return fallback()
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = TrainAttention.apply(query, key, value, keep, causal, float(scale))  # [B, Hq, T, D]
        return out.transpose(1, 2).contiguous(), None

    wrapped.__wrapped__ = attention
    return wrapped


@contextlib.contextmanager
def native_cpu_attention(enabled: bool = True):
    """Within: HF's "sdpa" attention over fp32 CPU tensors runs TrainAttention where it applies.
    Yields whether it is on. Calls nest; each restores what it found."""
    with sdpa_wrapped(with_native_attention, enabled and available()) as on:
        yield on
