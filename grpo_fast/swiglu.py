"""Gated MLP activation with a lean backward: silu(gate) * up that saves only its inputs.

Autograd on `act_fn(gate) * up` keeps three [T, I] tensors per layer for the backward pass:
gate (for silu's backward), silu(gate) and up (for the product's). The product's own output is
kept anyway by down_proj (and its LoRA A) as their input. Saving gate and up only and
recomputing silu in the backward drops one [T, I] tensor per layer, about an eighth of a
Llama block's activation memory, for one extra sigmoid pass:

    h      = silu(g) * u = g * s * u,                 s = sigmoid(g)
    dL/du  = dL/dh * g * s
    dL/dg  = dL/dh * u * s * (1 + g * (1 - s))         (d silu / dg = s + g * s * (1 - s))

On the CPU, for fp32 tensors, the forward and the backward are one pass each in the native core
(csrc/swiglu_cpu.cpp) instead of two and nine tensor ops: 4-6x less time on this activation,
most of the training pass's 1.06-1.15x at 128-token completions (benchmarks/
RESULTS.md, "Lean LoRA and SwiGLU"). For bf16 the backward is native (fp32 math, each gradient
rounded once, where PyTorch's ops round after each of their ~9 steps; 2x faster) and the forward
PyTorch's (its AVX512 bf16 kernel beat a native one that emulates the rounding in AVX2).
Elsewhere (CUDA, fp16, a build without the core) the PyTorch ops below run.

`use_lean_swiglu(model)` switches every Llama-style gated MLP (gate_proj, up_proj, down_proj,
SiLU) of a model to it; the math of the forward is unchanged.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from grpo_fast.models.causal_lm import SILU_ACTIVATIONS
from grpo_fast.native import cpu_lean_backend


def _native(*tensors: torch.Tensor):
    """The CPU core's functions when it can take these tensors (fp32 or bf16, contiguous, one
    shape and dtype), else None."""
    if any(t.shape != tensors[0].shape for t in tensors):
        return None
    return cpu_lean_backend("silu_mul_backward", *tensors)


class SiluMulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        # bf16: PyTorch's forward (faster than a native one with emulated rounding); the backward native
        core = _native(gate, up) if gate.dtype == torch.float32 else None
        if core is None:
            return F.silu(gate) * up
        out = torch.empty_like(gate)
        core.silu_mul(out.data_ptr(), gate.data_ptr(), up.data_ptr(), out.numel())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        want_gate, want_up = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad = grad.contiguous()
        core = _native(grad, gate, up)
        if core is not None:
            grad_gate = torch.empty_like(gate) if want_gate else None
            grad_up = torch.empty_like(up) if want_up else None
            core.silu_mul_backward(grad_gate.data_ptr() if want_gate else 0, grad_up.data_ptr() if want_up else 0,
                                   grad.data_ptr(), gate.data_ptr(), up.data_ptr(), grad.numel())
            return grad_gate, grad_up
        sig = torch.sigmoid(gate)
        grad_up = grad * gate * sig if want_up else None
        grad_gate = None
        if want_gate:
            grad_gate = grad * up * sig * (1 + gate * (1 - sig))
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, saving only gate and up for the backward."""
    return SiluMulFunction.apply(gate, up)


def _lean_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def use_lean_swiglu(model: torch.nn.Module) -> int:
    """Route every gated SiLU MLP of `model` through silu_mul; returns how many were switched.
    Modules with another activation (GELU, ...) or another layout are left as they are."""
    count = 0
    for module in model.modules():
        act = getattr(module, "act_fn", None)
        if act is None or type(act).__name__ not in SILU_ACTIVATIONS:
            continue
        if not all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
            continue
        module.forward = types.MethodType(_lean_forward, module)
        count += 1
    return count
