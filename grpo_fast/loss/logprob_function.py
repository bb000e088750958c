"""autograd.Function for selective log-probs: per-token logp and entropy from hidden states.

Forward: hidden [N, H] (compacted: only tokens that count), weight [V, H], bias [V] | None,
targets [N] → logp [N] fp32 (differentiable), entropy [N] fp32 (differentiable when the plan
says so: the entropy bonus). The logits are z = LogitTransform(h @ W.T + b) (temperature, scale,
soft cap; `grpo_fast.loss.head`). The heavy lifting is a backend module with the contract of
`grpo_fast.loss.logprob_cpu`:

    logprob_forward(hidden, weight, bias, targets, temperature, compute_entropy, *, logit_scale,
                    softcap) -> (logp, lse, entropy)
    logprob_backward(hidden, weight, bias, targets, lse, grad_logp, temperature, need_grad_weight,
                     need_grad_bias, *, logit_scale, softcap, entropy, grad_entropy)
                     -> (grad_hidden, grad_weight, grad_bias)

and optionally `logprob_forward_input_grad(...)`: a backend that offers it gets the frozen-head
case (only hidden needs a gradient, no soft cap) computed in the forward, d logp / d hidden (and,
where its ROW_PLANS flag says so, d entropy / d hidden for the rows a `RowGrads` plan selects),
and the backward is an elementwise product.

Row gather: `selective_logprob(..., rows=idx)` takes hidden [*lead, H] uncompacted (any
strides) and the flat indices [N] into its leading dims of the rows that count (targets [N]
compacted); the gradient reaches hidden, zero off those rows. A backend whose GATHERS_ROWS flag
is set gathers each chunk's rows itself in the gradient-ready forward, so the [N, H] compacted
copy of hidden never exists (N x H x 4 bytes of peak memory: 19 MiB at N = 8192, H = 576);
otherwise the Function compacts first.

Gradients go to weight and bias only when they require grad: a frozen LM head (QLoRA) never
allocates the [V, H] fp32 dW buffer.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from grpo_fast.loss.head import LogitTransform
from grpo_fast.loss.rows import gather_rows

BACKENDS = ("cpu", "triton")

# Frozen head: gradient-ready forward (2 matmuls of N·V·H) instead of recomputing the logits in
# the backward (3). Measured on CPU (benchmarks/RESULTS.md); False only to benchmark the other way.
USE_GRADIENT_READY_FORWARD = True


class RowGrads(NamedTuple):
    """Which rows need which input gradient, for the gradient-ready forward to skip work.

    Rows whose entropy is >= hot_threshold (every row when None) are hot: they get d logp / d h,
    and d entropy / d h when `entropy`. Cold rows get d logp / d h only when `cold_logp`. The
    backward refuses a nonzero gradient on a row the plan said would get none.
    """

    entropy: bool = False
    hot_threshold: float | Tensor | None = None
    cold_logp: bool = True


ALL_ROWS = RowGrads()


def get_backend(name: str) -> ModuleType:
    """The backend module; triton is imported lazily so CPU-only installs never need it."""
    if name == "cpu":
        from grpo_fast.loss import logprob_cpu

        return logprob_cpu
    if name == "triton":
        try:
            return importlib.import_module("grpo_fast.kernels.logprob")
        except ImportError as err:
            raise ValueError(
                f"backend='triton' needs triton and grpo_fast.kernels.logprob ({err}); "
                "use backend='cpu' or install the 'triton' extra") from err
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")


def _head_kwargs(head: LogitTransform) -> dict:
    return {"logit_scale": head.scale, "softcap": head.softcap}


class SelectiveLogProbFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, head, backend_name, compute_entropy, plan, rows):
        backend = get_backend(backend_name)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        entropy_grad = plan.entropy and (need_h or need_w or need_b)
        compute_entropy = compute_entropy or entropy_grad
        gradient_ready = (need_h and not need_w and not need_b and USE_GRADIENT_READY_FORWARD
                          and head.softcap is None and hasattr(backend, "logprob_forward_input_grad"))
        row_plans = getattr(backend, "ROW_PLANS", False)
        if entropy_grad and not row_plans:
            gradient_ready = False  # this backend's gradient-ready forward has no entropy gradient
        ctx.set_materialize_grads(False)
        ctx.gradient_ready, ctx.entropy_grad = gradient_ready, entropy_grad
        ctx.backend_name, ctx.head, ctx.hidden_dtype = backend_name, head, hidden.dtype
        ctx.rows, ctx.hidden_shape = rows, hidden.shape
        gathers = gradient_ready and row_plans and getattr(backend, "GATHERS_ROWS", False)
        if rows is not None and not gathers:
            hidden = gather_rows(hidden, rows)  # [N, H] compacted here
        if gradient_ready:
            args = (hidden, weight, bias, targets, head.temperature, compute_entropy)
            if row_plans:
                logp, lse, entropy, d_logp, d_entropy, logp_rows, entropy_rows = backend.logprob_forward_input_grad(
                    *args, logit_scale=head.scale, plan=plan._replace(entropy=entropy_grad),
                    **({"rows": rows} if gathers else {}))
            else:
                logp, lse, entropy, d_logp = backend.logprob_forward_input_grad(*args, logit_scale=head.scale)
                d_entropy = logp_rows = entropy_rows = None
            ctx.save_for_backward(d_logp, d_entropy, logp_rows, entropy_rows)
        else:
            logp, lse, entropy = backend.logprob_forward(
                hidden, weight, bias, targets, head.temperature, compute_entropy, **_head_kwargs(head))
            ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy if entropy_grad else None)
        if entropy is None:
            entropy = logp.new_zeros(0)
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        if not ctx.entropy_grad:
            grad_entropy = None
        if ctx.gradient_ready:
            d_logp, d_entropy, logp_rows, entropy_rows = ctx.saved_tensors
            g = grad_logp.float() if grad_logp is not None else d_logp.new_zeros(d_logp.shape[0])
            if logp_rows is not None:
                _refuse_unplanned(g, logp_rows, "logp")
            if grad_entropy is not None and entropy_rows is not None:
                _refuse_unplanned(grad_entropy, entropy_rows, "entropy")
            g_ent = grad_entropy.float() if grad_entropy is not None and d_entropy is not None else None
            return _grad_hidden_ready(ctx, g, d_logp, g_ent, d_entropy), None, None, None, None, None, None, None, None
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        need_w = ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        g = grad_logp.float().contiguous() if grad_logp is not None else lse.new_zeros(lse.shape)
        grad_hidden, grad_weight, grad_bias = get_backend(ctx.backend_name).logprob_backward(
            hidden, weight, bias, targets, lse, g, ctx.head.temperature, need_w, need_b,
            **_head_kwargs(ctx.head), entropy=entropy,
            grad_entropy=None if grad_entropy is None else grad_entropy.float().contiguous())
        if not ctx.needs_input_grad[0]:
            grad_hidden = None
        elif ctx.rows is not None:  # back to the uncompacted rows
            full = grad_hidden.new_zeros(ctx.hidden_shape)
            full.view(-1, full.shape[-1]).index_copy_(0, ctx.rows, grad_hidden)
            grad_hidden = full
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


# rows of grad_hidden formed at a time from D and D' (a bound on the [rows, H] temporaries)
GRAD_ROWS_CHUNK = 4096


def _grad_hidden_ready(ctx, g: Tensor, d_logp: Tensor, g_ent: Tensor | None, d_entropy: Tensor | None) -> Tensor:
    """grad_hidden = g[:, None] D + g'[:, None] D' ([N, H], in hidden's dtype), or with row gather
    the same rows written straight into a zero tensor of hidden's shape: formed GRAD_ROWS_CHUNK
    rows at a time, so no [N, H] temporary sits beside D and the result."""
    n = d_logp.shape[0]
    shape = (n, d_logp.shape[1]) if ctx.rows is None else ctx.hidden_shape
    full = d_logp.new_zeros(shape, dtype=ctx.hidden_dtype)
    out = full.view(-1, d_logp.shape[1])  # [N or M, H], contiguous
    for s in range(0, n, GRAD_ROWS_CHUNK):
        e = min(s + GRAD_ROWS_CHUNK, n)
        part = g[s:e].unsqueeze(1) * d_logp[s:e]  # [C, H] fp32
        if g_ent is not None:
            part.addcmul_(g_ent[s:e].unsqueeze(1), d_entropy[s:e])
        if ctx.rows is None:
            out[s:e] = part
        else:
            out.index_copy_(0, ctx.rows[s:e], part.to(ctx.hidden_dtype))
    return full


def _refuse_unplanned(grad: Tensor, computed: Tensor, what: str) -> None:
    """The gradient-ready forward skipped these rows' d/dh because the plan said no gradient
    would reach them: a nonzero one means the caller's plan was wrong. Never a silent zero."""
    if bool((grad[~computed] != 0).any()):
        raise RuntimeError(f"selective_logprob: a gradient reached the {what} of rows whose d {what} / d hidden "
                           f"was not computed (RowGrads plan); this is a bug in the caller")


def selective_logprob(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, head: LogitTransform | float,
    backend: str, compute_entropy: bool = True, plan: RowGrads = ALL_ROWS, rows: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(logp [N] fp32 with autograd, entropy [N] fp32 or None) for compacted rows; `head` is a
    LogitTransform or a temperature. With `rows` [N] (int64 flat indices into the leading dims of
    hidden [*lead, H]) the rows are those positions, gathered by the backend where it can (see
    the module docstring)."""
    if not isinstance(head, LogitTransform):
        head = LogitTransform(float(head))
    if rows is not None and rows.shape != targets.shape:
        raise ValueError(f"rows {tuple(rows.shape)} and targets {tuple(targets.shape)} must have the same shape [N]")
    logp, entropy = SelectiveLogProbFunction.apply(hidden, weight, bias, targets, head, backend, compute_entropy, plan,
                                                   rows)
    return logp, (entropy if (compute_entropy or plan.entropy) else None)
