"""fp32 CPU matrix products on oneDNN where torch would run them on MKL.

torch computes an fp32 ``F.linear`` / ``torch.mm`` on the CPU with MKL's sgemm. On AMD CPUs MKL
takes its AVX2 kernels whatever the CPU has (it picks AVX-512 kernels on Intel CPUs only).
oneDNN, which torch ships as well (``torch.ops.mkldnn``), picks its kernels by the CPU's
features. On the AMD EPYC (Zen 5, AVX-512) this project is measured on, x W^T at a training
micro-batch's rows (1,344 x 576 -> 1,536) ran at 425 GFLOPS on oneDNN against MKL's 211, and
dY W (the input's gradient) at 486 against 212 (benchmarks/RESULTS.md, "fp32 on AVX-512 and
oneDNN"). The math is the same product; only the order of the fp32 sums inside it differs.

    y = linear(x, weight, bias)     # x [..., K], weight [N, K] (any strides) -> x W^T + b

``Linear`` is the autograd function of it (dL/dx = dL/dy W, itself a oneDNN product; dL/dW =
dL/dy^T x, ``weight_grad``, only where W requires a gradient). ``wants(x, weight)`` says whether
the oneDNN path applies: fp32 CPU tensors, torch built with oneDNN's linear, and
GRPO_FAST_NO_ONEDNN_FP32=1 not set (read at call time, so a benchmark can switch it per step).

``use_onednn_linears(model)`` routes a fully fine-tuned model's plain ``nn.Linear`` layers through
``Linear`` (lean_lora does it for LoRA layers' base products).
"""

from __future__ import annotations

import os
import types

import torch

SWITCH_OFF = "GRPO_FAST_NO_ONEDNN_FP32"


def in_torch() -> bool:
    """oneDNN's linear is in this torch build (CPU builds with mkldnn)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def available() -> bool:
    """oneDNN's linear is in this torch build and the fp32 path is not switched off."""
    return os.environ.get(SWITCH_OFF) != "1" and in_torch()


def wants(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x W^T takes oneDNN: both fp32 CPU tensors, and oneDNN available."""
    return (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and weight.device.type == "cpu" and available())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b on oneDNN, no autograd: x [..., K], weight [N, K] (or one packed by
    torch.ops.mkldnn._reorder_linear_weight), bias [N] -> [..., N]."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")


class Linear(torch.autograd.Function):
    """y = x W^T + b, x [M, K] (2-D), both products of the backward that a frozen weight needs on
    oneDNN: dL/dx = dL/dy W = linear(dL/dy, W^T), W^T read through its strides (no copy)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        # what each gradient needs, and only that (as autograd's own mm saves)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
        ctx.has_bias = bias is not None
        return linear(x, weight, bias)  # [M, N]

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = linear(grad_y, weight.t())  # [M, K]
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(grad_y, x)  # [N, K]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.sum(0)
        return grad_x, grad_w, grad_b


def weight_grad(grad_y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dL/dW = dL/dy^T x [N, K] for grad_y [M, N] and x [M, K]: a long reduction over the M rows.
    oneDNN runs it fast where the product's output is short and wide, and slowly where it is tall
    and narrow (at M = 1,016: [16, 576] 233 GFLOPS against MKL's 131, [576, 16] 69 against 164;
    [576, 1,536] 411 against 217). So a narrow one is computed transposed, (x^T dL/dy)^T, and
    returned as that transposed view. Off oneDNN (``wants``): torch's product."""
    if not wants(grad_y, x):
        return grad_y.t().mm(x)
    if x.shape[1] >= grad_y.shape[1]:
        return linear(grad_y.t(), x.t())  # [N, K]
    return linear(x.t(), grad_y.t()).t()  # ([K, N])^T


def linear_module(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """module(x) for an nn.Linear and 2-D x: on oneDNN where ``wants`` says so, else the module."""
    if x.dim() == 2 and wants(x, module.weight):
        return Linear.apply(x, module.weight, module.bias)
    return module(x)


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b for 2-D a [M, K], b [K, N]: on oneDNN where ``wants(a, b)`` (b read as the weight
    b^T [N, K] through its strides), else torch.mm. With ``out`` the product is written there
    (oneDNN writes a new tensor, which is then copied)."""
    if not wants(a, b):
        return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
    y = linear(a, b.t())  # [M, N]
    return y if out is None else out.copy_(y)


def _linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.dim() >= 2 and wants(x, self.weight):
        rows = x.reshape(-1, x.shape[-1])  # [N, in]
        return Linear.apply(rows, self.weight, self.bias).view(*x.shape[:-1], self.out_features)
    return torch.nn.functional.linear(x, self.weight, self.bias)


def use_onednn_linears(model: torch.nn.Module) -> int:
    """Route every plain ``nn.Linear`` of `model` (exact type: not peft's or bitsandbytes' layers)
    through ``Linear`` where ``wants`` says so, at call time; returns how many were switched (a
    layer already switched counts again, unchanged). Module hooks still run: they wrap forward."""
    count = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear:
            continue
        if "forward" not in module.__dict__:
            module.forward = types.MethodType(_linear_forward, module)
        count += 1
    return count
