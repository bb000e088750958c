"""LoRA linear layers whose adapter term is added by the GEMM that computes it.

peft's LoRA layer computes

    y = base(x) + B(A(dropout(x))) * s                      x [N, in], A [r, in], B [out, r]

as four passes over [N, out] tensors: the product x A^T B^T is written, read and written again
scaled by s, then read with base(x) and written as y; and in the backward dL/dy is read and
written once more (times s) before it reaches B. Here the same sum is one `addmm`:

    y = base(x).addmm_(A(dropout(x)), B^T, alpha=s)         = base(x) + s * (x A^T) B^T

which adds into the base product in place, and whose backward scales the small [N, r] and
[r, out] products instead of dL/dy (dL/d(base) is dL/dy itself, not copied). Base layers other
than torch / bitsandbytes linears get the out-of-place `addmm` (their output might be held
elsewhere). Same math and the same saved tensors (x A^T and B, as lora_B kept before). In fp32
on the CPU the sum is `_AddUpProduct`: the same addmm_, with its backward's two narrow products
(dL/d(x A^T), dL/dB) on oneDNN, as lora_A's and the base's products are (grpo_fast.onednn_gemm).

Measured (benchmarks/RESULTS.md, "Lean LoRA and SwiGLU"): the passes it removes leave the
training pass's profile on the CPU (its aten::mul / aten::add), but per layer the time moved
within this machine's noise (1.00-1.08x); on a GPU each of those passes is a separate
memory-bound kernel (not measured).

`use_lean_lora(model)` switches every peft LoRA linear layer (plain or bitsandbytes 4-/8-bit
base) of a model to it. A call the lean path does not cover runs peft's own forward unchanged:
adapters disabled or merged, per-sample `adapter_names`, variants (DoRA...), a bias on lora_B,
hooks on lora_B (which the addmm would bypass), or A and B in different dtypes.

Adapters in a wider dtype than the base (peft's default for a bf16 model: fp32 adapters,
`autocast_adapter_dtype`): peft promotes the base product to fp32 for the sum and casts it back;
here the promoted copy takes the addmm in place and is cast back once (peft: the fp32 product,
its scaled copy, the promoted sum, then the cast; and dL/dy scaled in fp32 in the backward).
"""

from __future__ import annotations

import types

import torch

from grpo_fast import onednn_gemm

_BNB_LINEARS = ("Linear4bit", "Linear8bitLt")  # bitsandbytes' quantized linears (and peft's LoRA over them)
_LORA_LAYER_NAMES = ("Linear", *_BNB_LINEARS)


def _lean_path_covers(layer, args, kwargs) -> bool:
    if args or kwargs or layer.disable_adapters or layer.merged:
        return False
    variants = getattr(layer, "lora_variant", {}) or {}
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if name in variants or getattr(layer, "use_dora", {}).get(name, False):
            return False
        b = layer.lora_B[name]
        if b.bias is not None or b._forward_hooks or b._forward_pre_hooks:
            return False
    return True


def _writes_fresh_output(base) -> bool:
    """Whether base(x) returns a new tensor that nothing else holds (a linear layer's product), so
    the adapter term may be added into it in place. Unknown base layers get an out-of-place sum."""
    return type(base) is torch.nn.Linear or type(base).__name__ in _BNB_LINEARS


def _lean_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if self.disable_adapters and not self.merged and not args and not kwargs and type(self.base_layer) is torch.nn.Linear:
        # the base layer alone (what peft's forward then computes): the reference model's pass
        return _base_rows(self.base_layer, x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)
    if not _lean_path_covers(self, args, kwargs):
        return self._peft_forward(x, *args, **kwargs)
    fresh = _writes_fresh_output(self.base_layer)
    rows = x.reshape(-1, x.shape[-1])  # [N, in]
    # A fresh 2-D product takes the sum in place (addmm_: no copy of it; the mm's backward keeps
    # its inputs, not its output). A 3-D one would be a view, which autograd would rebase.
    result = _base_rows(self.base_layer, rows) if fresh else self.base_layer(x).reshape(rows.shape[0], -1)  # [N, out]
    out_dtype = result.dtype
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        a, b = self.lora_A[name], self.lora_B[name]
        if a.weight.dtype != b.weight.dtype:
            return self._peft_forward(x, *args, **kwargs)
        if result.dtype != b.weight.dtype:
            if not _promotes_to(result.dtype, b.weight.dtype):
                return self._peft_forward(x, *args, **kwargs)
            # peft's sum promotes the base product to the adapters' dtype (fp32 adapters over a
            # bf16 base: peft's default) and casts back at the end; the cast is a fresh tensor
            result, fresh = result.to(b.weight.dtype), True
        xa = _base_rows(a, self.lora_dropout[name](rows.to(a.weight.dtype)))  # [N, r]
        if fresh and onednn_gemm.wants(xa, b.weight):
            result = _AddUpProduct.apply(result, xa, b.weight, self.scaling[name])
        elif fresh:
            result.addmm_(xa, b.weight.t(), alpha=self.scaling[name])
        else:
            result = torch.addmm(result, xa, b.weight.t(), alpha=self.scaling[name])
            fresh = True  # addmm's output is its own
    return result.to(out_dtype).view(*x.shape[:-1], result.shape[-1])


class _AddUpProduct(torch.autograd.Function):
    """y + s (xa B^T), added into y in place (a fresh fp32 product: addmm_ as above), xa [N, r],
    B [out, r]. The backward is addmm's, with both of its products on oneDNN (MKL runs these
    narrow fp32 shapes at 90-190 GFLOPS on AMD CPUs; oneDNN 230-380, benchmarks/RESULTS.md,
    "Queries in the vector lanes", item 3): dL/dxa = (dL/dy B) s, dL/dB = (dL/dy^T xa) s."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, xa: torch.Tensor, weight_b: torch.Tensor, scale: float):
        ctx.mark_dirty(y)
        ctx.save_for_backward(xa if ctx.needs_input_grad[2] else None,
                              weight_b if ctx.needs_input_grad[1] else None)
        ctx.scale = scale
        return y.addmm_(xa, weight_b.t(), alpha=scale)  # [N, out]

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        xa, weight_b = ctx.saved_tensors
        grad_xa = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_xa = onednn_gemm.mm(grad_y, weight_b).mul_(ctx.scale)  # [N, r]
        if ctx.needs_input_grad[2]:
            grad_b = onednn_gemm.weight_grad(grad_y, xa).mul_(ctx.scale)  # [out, r] (a fresh product)
        return grad_y if ctx.needs_input_grad[0] else None, grad_xa, grad_b, None


def _base_rows(base, rows: torch.Tensor) -> torch.Tensor:
    """base(rows) [N, out] (a base layer, or lora_A); a plain, unhooked fp32 nn.Linear on the CPU
    computes it on oneDNN (grpo_fast.onednn_gemm: MKL's fp32 GEMM runs its AVX2 kernels on AMD
    CPUs), and so does its input's gradient."""
    if type(base) is torch.nn.Linear and not base._forward_hooks and not base._forward_pre_hooks:
        return onednn_gemm.linear_module(base, rows)
    return base(rows)


def _promotes_to(base: torch.dtype, adapter: torch.dtype) -> bool:
    """Whether peft's `base + adapter` sum is computed in the adapter's dtype (torch's promotion),
    as the lean path then computes it: a half-precision base under fp32 adapters."""
    return torch.promote_types(base, adapter) == adapter


def _is_peft_lora_linear(module) -> bool:
    cls = type(module)
    return (cls.__name__ in _LORA_LAYER_NAMES and cls.__module__.startswith("peft.tuners.lora")
            and hasattr(module, "lora_A") and hasattr(module, "base_layer"))


def use_lean_lora(model: torch.nn.Module) -> int:
    """Route every peft LoRA linear layer of `model` through the addmm forward above; returns how
    many were switched (a layer already switched counts again, unchanged). Other modules (LoRA
    embeddings, convolutions, non-peft layers) are left as they are."""
    count = 0
    for module in model.modules():
        if not _is_peft_lora_linear(module):
            continue
        if "_peft_forward" not in module.__dict__:
            module._peft_forward = module.forward  # peft's bound forward, for the calls above
            module.forward = types.MethodType(_lean_forward, module)
        count += 1
    return count
