"""A CPU decode step with each decoder layer as one native call (csrc/decode_layer_cpu.cpp).

Layer by layer from Python the decode step is ~15 calls per layer (norms, q/k/v, RoPE, KV
append, attention, o_proj, MLP), and their interpreter and tensor bookkeeping cost ~0.6 ms per
layer at 32 sequences here: ~10% of a SmolLM2-135M step. When every layer is made of modules
the native kernels compute exactly (see ``native_layers``), the layer runs as one call: the same
kernels, chained in C++ over scratch buffers. The weights are read in place at call time.

Taken for plain fp32 CPU models (the full-precision policy, the benchmark's model) when a step has
8..256 sequences; LoRA-wrapped, quantized, Qwen3 (per-head q/k norms), hooked or otherwise
different layers, and GRPO_FAST_NO_NATIVE_LAYER=1, take LlamaFamily.forward's per-module path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from grpo_fast.kv.decode_step import DecodeStep
from grpo_fast.models import cpu_ops
from grpo_fast.models import decode_fast_paths as fast
from grpo_fast.models.causal_lm import GATED_MLPS, SILU_ACTIVATIONS
from grpo_fast.models.llama_family import LlamaFamily


@dataclass
class NativeLayers:
    """Per layer: the 13 weight pointers of cpu_decode_layer (0 = no bias) and the two norm eps."""

    pointers: list[list[int]]
    eps: list[list[float]]
    keep: list[torch.Tensor]  # tensors behind the pointers that exist only here (contiguous copies)
    intermediate: int

    @staticmethod
    def accepts(num_rows: int) -> bool:
        return fast.NATIVE_MIN <= num_rows <= fast.SMALL_M


def native_layers(family: LlamaFamily) -> NativeLayers | None:
    """The layers' pointers when all of them qualify, else None; checked once per fast-path scope
    (a generate call) as the weights may be swapped or wrapped between calls."""
    if os.environ.get("GRPO_FAST_NO_NATIVE_LAYER") == "1":
        return None
    return family.fast.memoized(family.decoder, "native_layers", lambda: _build(family))


def _plain_parts(family: LlamaFamily, module) -> fast.Parts | None:
    parts = family.fast.parts(module)
    ok = parts is not None and not parts.terms and parts.dtype == torch.float32 and parts.contiguous
    return parts if ok else None


def _build(family: LlamaFamily) -> NativeLayers | None:
    if not cpu_ops.available() or family.device.type != "cpu" or family.dtype != torch.float32:
        return None
    pointers, eps, keep, inter = [], [], [], None
    for layer in family.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if hasattr(attn, "q_norm") or type(mlp).__name__ not in GATED_MLPS or not fast.unhooked(mlp):
            return None
        act = mlp.act_fn
        if type(act).__name__ not in SILU_ACTIVATIONS or not fast.unhooked(act):
            return None
        norms = [fast.native_norm(layer.input_layernorm), fast.native_norm(layer.post_attention_layernorm)]
        projs = [_plain_parts(family, m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)]
        mlps = [_plain_parts(family, m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
        if any(p is None for p in norms + projs + mlps) or any(p.base.bias is not None for p in mlps):
            return None
        ptrs = [norms[0][0].data_ptr()]
        for p in projs:
            bias = p.base.bias
            if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
                bias = bias.float().contiguous()
                keep.append(bias)
            ptrs += [p.base.weight.data_ptr(), 0 if bias is None else bias.data_ptr()]
        ptrs += [norms[1][0].data_ptr()] + [p.base.weight.data_ptr() for p in mlps]
        pointers.append(ptrs)
        eps.append([norms[0][1], norms[1][1]])
        inter = mlps[0].base.out_features
    return NativeLayers(pointers, eps, keep, inter)


def decode_forward(family: LlamaFamily, layers: NativeLayers, input_ids: torch.Tensor, positions: torch.Tensor,
                   step: DecodeStep, kv_cache: torch.Tensor) -> torch.Tensor:
    """Logits [S, V] fp32 of one decode step (one token per sequence, input_ids/positions [S]);
    kv_cache [L, 2, num_blocks, block_size, Hkv, D] (contiguous), step: this step's slots,
    block tables and context lengths."""
    hidden, rotary = family.embed(input_ids, positions)  # [S, H]
    hidden = hidden.contiguous()
    s = family.shape
    nb, bs = kv_cache.shape[2], kv_cache.shape[3]
    per_cache = kv_cache[0, 0].numel() * kv_cache.element_size()  # bytes of one layer's K (or V)
    base = kv_cache.data_ptr()
    for idx in range(s.num_layers):
        key_ptr = base + (2 * idx) * per_cache
        cpu_ops.decode_layer(hidden, layers.intermediate, s.num_q_heads, s.num_kv_heads, s.head_dim,
                             layers.pointers[idx], layers.eps[idx], rotary.cos, rotary.sin,
                             key_ptr, key_ptr + per_cache, step, nb, bs, s.scale)
    return family.logits(hidden)
