"""A CPU decode step with the whole decoder stack as one native call (csrc/decode_layer_cpu.cpp).

Layer by layer from Python the decode step is ~15 calls per layer (norms, q/k/v, RoPE, KV
append, attention, o_proj, MLP), and their interpreter and tensor bookkeeping cost ~0.6 ms per
layer at 32 sequences here: ~10% of a SmolLM2-135M step. When every layer is made of modules
the native kernels compute exactly (see ``native_layers``), the stack runs as one call: the same
kernels, chained in C++ over scratch buffers. The weights are read in place at call time.

Taken for fp32 CPU models whose block linears are plain ``nn.Linear`` or vanilla peft LoRA layers
over one (unmerged, dropout off at sampling time, any number of active adapters: the trainer's
policy), when a step has 8..256 sequences. A LoRA layer's adapters run inside the fused
projections (csrc/linear_cpu.cpp: A x as extra packed rows, B added into the same output tile),
reading lora_A / lora_B in place, so an optimizer step between two generate calls is seen by the
next one; the set of active adapters is read once per generate call. Quantized, Qwen3 (per-head
q/k norms), hooked, DoRA or otherwise different layers, and GRPO_FAST_NO_NATIVE_LAYER=1, take
LlamaFamily.forward's per-module path.
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

_C = cpu_ops._C


@dataclass
class NativeLayers:
    """The native stack (_C.CpuDecodeModel: per layer the 13 weight pointers of
    csrc/decode_layer_cpu.h, the two norm eps and each projection's LoRA terms), and the tensors
    behind pointers that exist only here (contiguous fp32 copies of biases)."""

    model: object
    keep: list[torch.Tensor]
    num_adapters: int  # LoRA terms over all layers (0: a plain model)

    @staticmethod
    def accepts(num_rows: int) -> bool:
        return fast.NATIVE_MIN <= num_rows <= fast.SMALL_M


def native_layers(family: LlamaFamily) -> NativeLayers | None:
    """The stack when all layers qualify, else None; built once per fast-path scope (a generate
    call) as the weights may be swapped, wrapped or have adapters toggled between calls."""
    if os.environ.get("GRPO_FAST_NO_NATIVE_LAYER") == "1":
        return None
    return family.fast.memoized(family.decoder, "native_layers", lambda: _build(family))


def _native_parts(family: LlamaFamily, module) -> fast.Parts | None:
    """The module's fast-path parts when the native stack computes it exactly: fp32, contiguous
    weights, a plain linear or LoRA over one."""
    parts = family.fast.parts(module)
    ok = parts is not None and parts.dtype == torch.float32 and parts.contiguous
    return parts if ok else None


def _build(family: LlamaFamily) -> NativeLayers | None:
    if (not cpu_ops.available() or not hasattr(_C, "CpuDecodeModel") or family.device.type != "cpu"
            or family.dtype != torch.float32):
        return None
    s = family.shape
    model, keep, adapters = None, [], 0
    for layer in family.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if hasattr(attn, "q_norm") or type(mlp).__name__ not in GATED_MLPS or not fast.unhooked(mlp):
            return None
        act = mlp.act_fn
        if type(act).__name__ not in SILU_ACTIVATIONS or not fast.unhooked(act):
            return None
        norms = [fast.native_norm(layer.input_layernorm), fast.native_norm(layer.post_attention_layernorm)]
        projs = [_native_parts(family, m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)]
        mlps = [_native_parts(family, m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
        if any(p is None for p in norms + projs + mlps) or any(p.base.bias is not None for p in mlps):
            return None
        hidden, inter = projs[3].base.out_features, mlps[0].base.out_features
        qd, kd = s.num_q_heads * s.head_dim, s.num_kv_heads * s.head_dim
        shapes = [(qd, hidden), (kd, hidden), (kd, hidden), (hidden, qd), (inter, hidden), (inter, hidden),
                  (hidden, inter)]
        if [tuple(p.base.weight.shape) for p in projs + mlps] != shapes:
            return None  # not the layout the config describes: leave it to the modules
        if model is None:
            model = cpu_ops.decode_model(hidden, inter, s.num_q_heads, s.num_kv_heads, s.head_dim)
        elif (hidden, inter) != (model.hidden, model.intermediate):
            return None
        ptrs = [norms[0][0].data_ptr()]
        for p in projs:
            bias = p.base.bias
            if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
                bias = bias.float().contiguous()
                keep.append(bias)
            ptrs += [p.base.weight.data_ptr(), 0 if bias is None else bias.data_ptr()]
        ptrs += [norms[1][0].data_ptr()] + [p.base.weight.data_ptr() for p in mlps]
        lora = [cpu_ops.lora_args("lora", p.terms, p.base.in_features, p.base.out_features) for p in projs + mlps]
        adapters += sum(len(t) for t in lora)
        model.add_layer(ptrs, [norms[0][1], norms[1][1]], lora)
    return NativeLayers(model, keep, adapters)


def decode_forward(family: LlamaFamily, layers: NativeLayers, input_ids: torch.Tensor, positions: torch.Tensor,
                   step: DecodeStep, kv_cache: torch.Tensor) -> torch.Tensor:
    """Logits [S, V] fp32 of one decode step (one token per sequence, input_ids/positions [S]);
    kv_cache [L, 2, num_blocks, block_size, Hkv, D] (contiguous), step: this step's slots,
    block tables, context lengths and cascade groups."""
    hidden, rotary = family.embed(input_ids, positions)  # [S, H]
    hidden = hidden.contiguous()
    cpu_ops.decode_layers(layers.model, hidden, rotary.cos, rotary.sin, kv_cache, step, family.shape.head_dim)
    return family.logits(hidden)
