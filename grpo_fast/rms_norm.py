"""The families' RMSNorm in the training pass: forward and backward one native pass per row.

HF's RMSNorm (Llama, Qwen2, Qwen3, Mistral) is

    y = w * (x * r),    r = 1 / sqrt(mean(x^2) + eps)     over the last dim

in seven tensor ops, and autograd's backward of them is about ten more, each a pass over [T, H].
On the CPU for fp32 and bf16 tensors both directions here are one pass per row (csrc/
rms_norm_cpu.cpp; bf16 rounds where HF's module does in bf16: y = bf16(w * bf16(x * r))):

    dL/dx = r * g - x * r^3 * mean(g * x),    g = w * dL/dy

with r recomputed from x in the backward, so the forward keeps x (and w), as autograd kept
before. dL/dw = sum over rows of dL/dy * x * r, when w is trained (full fine-tuning), comes
from PyTorch ops. Elsewhere (CUDA, fp16, a build without the core) the module's own forward runs.

`use_lean_rms_norm(model)` switches every RMSNorm of those families in a model; other norms
(Gemma's 1 + w, LayerNorm) are left as they are.
"""

from __future__ import annotations

import types

import torch

from grpo_fast.models import cpu_ops
from grpo_fast.models.causal_lm import RMS_NORMS
from grpo_fast.native import cpu_lean_backend


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, core) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.eps, ctx.core = eps, core
        return cpu_ops.rms_norm(x, weight, eps)  # [..., H], the decode step's kernel

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x)
            if x.numel():
                ctx.core.rms_norm_backward(grad_x.data_ptr(), grad.data_ptr(), x.data_ptr(), weight.data_ptr(),
                                           x.numel() // x.shape[-1], x.shape[-1], ctx.eps)
        if ctx.needs_input_grad[1]:
            if x.dtype == torch.float32:
                r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ctx.eps)  # [..., 1]
                grad_w = (grad * x * r).reshape(-1, x.shape[-1]).sum(0)  # [H]
            else:  # bf16: summed in fp32 over the rows, rounded once
                xf = x.float()
                r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + ctx.eps)  # [..., 1]
                grad_w = (grad.float() * (xf * r)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)  # [H]
        return grad_x, grad_w, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """weight * x / sqrt(mean(x^2, -1) + eps) on the native core, or None where it cannot run it
    (not contiguous fp32 / bf16 CPU tensors of one dtype, weight not [H], no native build)."""
    if x.dim() < 1 or weight.shape != (x.shape[-1],):
        return None
    core = cpu_lean_backend("rms_norm_backward", x, weight)
    return None if core is None else RMSNormFunction.apply(x, weight, float(eps), core)


def _lean_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    out = rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return self._module_forward(hidden_states) if out is None else out


def _stop_cpu_kernelization(model: torch.nn.Module) -> None:
    """transformers' hub kernels (`use_kernels`, on by default where the `kernels` package is
    installed) re-kernelize a model at its first train() / eval(), which puts every RMSNorm's class
    forward back over the one set here: the lean norm ran until the first sampling phase, then
    never again. On the CPU there is no hub kernel to run (and nothing may be downloaded), so
    kernelization is switched off before the norms are switched."""
    for module in model.modules():
        params = next(module.parameters(), None)
        if getattr(module, "use_kernels", False) and params is not None and params.device.type == "cpu":
            module.use_kernels = False  # resets once (the torch forwards); train() / eval() then leave them


def use_lean_rms_norm(model: torch.nn.Module) -> int:
    """Route every RMSNorm of the supported families in `model` through the native pass above;
    returns how many (a norm already switched counts again, unchanged). On the CPU the model's
    hub-kernel switching is turned off first, so that train() / eval() keep them switched."""
    _stop_cpu_kernelization(model)
    count = 0
    for module in model.modules():
        if type(module).__name__ not in RMS_NORMS or not hasattr(module, "variance_epsilon"):
            continue
        if "_module_forward" not in module.__dict__:
            module._module_forward = module.forward
            module.forward = types.MethodType(_lean_forward, module)
        count += 1
    return count
