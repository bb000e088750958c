"""autograd.Function for selective log-probs: per-token logp (and entropy) from hidden states.

Forward: hidden [N, H] (compacted: only tokens that count), weight [V, H], bias [V] | None,
targets [N] → logp [N] fp32 (differentiable), entropy [N] fp32 (not differentiable). The heavy
lifting is a backend module with the contract of `grpo_fast.logprob_cpu`:

    logprob_forward(hidden, weight, bias, targets, temperature, compute_entropy) -> (logp, lse, entropy)
    logprob_backward(hidden, weight, bias, targets, lse, grad_logp, temperature,
                     need_grad_weight, need_grad_bias) -> (grad_hidden, grad_weight, grad_bias)

and optionally `logprob_forward_input_grad(...) -> (logp, lse, entropy, dlogp_dhidden [N, H] fp32)`:
a backend that offers it gets the frozen-head case (only hidden needs a gradient) computed in the
forward, and the backward is one elementwise product.

Gradients go to weight and bias only when they require grad: a frozen LM head (QLoRA) never
allocates the [V, H] fp32 dW buffer.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor

BACKENDS = ("cpu", "triton")

# Frozen head: gradient-ready forward (2 matmuls of N·V·H) instead of recomputing the logits in
# the backward (3). Measured on CPU (benchmarks/RESULTS.md); False only to benchmark the other way.
USE_GRADIENT_READY_FORWARD = True


def get_backend(name: str) -> ModuleType:
    """The backend module; triton is imported lazily so CPU-only installs never need it."""
    if name == "cpu":
        from grpo_fast import logprob_cpu

        return logprob_cpu
    if name == "triton":
        try:
            return importlib.import_module("grpo_fast.kernels.logprob")
        except ImportError as err:
            raise ValueError(
                f"backend='triton' needs triton and grpo_fast.kernels.logprob ({err}); "
                "use backend='cpu' or install the 'triton' extra") from err
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")


class SelectiveLogProbFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, backend_name, compute_entropy):
        backend = get_backend(backend_name)
        need_w = ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        frozen_head = ctx.needs_input_grad[0] and not need_w and not need_b and USE_GRADIENT_READY_FORWARD
        input_grad = getattr(backend, "logprob_forward_input_grad", None) if frozen_head else None
        if input_grad is not None:
            logp, lse, entropy, dlogp_dh = input_grad(
                hidden, weight, bias, targets, temperature, compute_entropy)
            ctx.save_for_backward(dlogp_dh)
        else:
            logp, lse, entropy = backend.logprob_forward(
                hidden, weight, bias, targets, temperature, compute_entropy)
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.gradient_ready = input_grad is not None
        ctx.backend_name, ctx.temperature = backend_name, temperature
        ctx.hidden_dtype = hidden.dtype
        if entropy is None:
            entropy = logp.new_zeros(0)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        if ctx.gradient_ready:
            (dlogp_dh,) = ctx.saved_tensors
            grad_hidden = (grad_logp.float().unsqueeze(1) * dlogp_dh).to(ctx.hidden_dtype)
            return grad_hidden, None, None, None, None, None, None
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_w = ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        backend = get_backend(ctx.backend_name)
        grad_hidden, grad_weight, grad_bias = backend.logprob_backward(
            hidden, weight, bias, targets, lse, grad_logp.float().contiguous(), ctx.temperature,
            need_w, need_b)
        if not ctx.needs_input_grad[0]:
            grad_hidden = None
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def selective_logprob(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float,
    backend: str, compute_entropy: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """(logp [N] fp32 with autograd, entropy [N] fp32 or None) for compacted rows."""
    logp, entropy = SelectiveLogProbFunction.apply(
        hidden, weight, bias, targets, float(temperature), backend, compute_entropy)
    return logp, (entropy if compute_entropy else None)
