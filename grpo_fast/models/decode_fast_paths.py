"""Fast paths of a decode step's layers: ``module(x)`` for a few rows, computed from the module's
live weights by the fastest CPU path that gives the same math, else by calling the module.

A layer qualifies when it is a plain ``nn.Linear`` (exact type, no hooks) or a vanilla peft LoRA
``Linear`` over one (unmerged, no DoRA or other variant, dropout off): then
module(x) = x W^T + b + sum_i s_i (x A_i^T) B_i^T, with W, b, A_i, B_i read at call time, so the
sampler always runs the live policy. Anything else (bitsandbytes 4-bit, hooked layers, CUDA
tensors, other dtypes) is called as a module, unchanged.

CPU fp32 paths, for M rows:
- native (grpo_fast.models.cpu_ops, AVX2+FMA, 8 <= M <= 256): the weight read in place by a
  register-tiled kernel, outputs written (or accumulated) straight into [M, N];
- transposed (M <= 256): (W @ x^T)^T with MKL. For few rows MKL splits x @ W^T over the rows, so
  every thread streams the whole weight; W @ x^T is split over the weight's rows.

CPU bf16 paths, where a weight is not packed (below): transposed too (oneDNN runs W x^T ~20%
faster than x W^T at 32 rows), the products back into rows by a native transpose
(cpu_ops.transpose_bf16). A LoRA-wrapped bf16
policy keeps peft's fp32 adapters (its default); their terms are added into the transposed
products natively, one call per group of modules that read the same input (q, k, v; gate, up).
A bias goes into the product's one op (b + W x^T by addmm: F.linear's single rounding, bit for
bit); the row-major add is left for inputs whose rows are strided.

CPU bf16 within a scope (a generate call), where torch has oneDNN's packed linear: each base weight
is reordered once into oneDNN's blocked layout (``FastPaths.packed``: ~90 ms for SmolLM2-135M's
210 block linears, ~28 ms for its LM head, a copy held until the scope ends) and every product is
x W^T + b from it, F.linear bit for bit at every row count; a LoRA layer's fp32 adapters are then
added into the rows (the row-major native add). Streaming the weights from DRAM as a decode step
does, a layer's seven products ran 1.18-1.19x faster than on the W x^T paths, the sampler
1.08-1.12x (benchmarks/RESULTS.md, "bf16 decode on packed weights").
GRPO_FAST_NO_PACKED_WEIGHTS=1 keeps the W x^T paths.

Also fused here: ``linear_add_`` (residual: into += module(x), no [M, N] temporary on the native
path) and the gated MLPs of the supported families, down(act(gate(x)) * up(x)), whose
silu(gate) * up is one native pass (adapters included) when gate and up carry no bias; and ``rms_norm``:
the families' RMSNorm modules as one native pass per row instead of seven tensor ops; and
``Rotary``: RoPE of q and k, one native call per layer.

The paths that depend on a module's facts are methods of ``FastPaths``, which remembers those
facts within a scope (a generate call); its owner is the model runner, through LlamaFamily.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from grpo_fast import onednn_gemm
from grpo_fast.models import cpu_ops
from grpo_fast.models.causal_lm import GATED_MLPS, RMS_NORMS, SILU_ACTIVATIONS

# Up to this many rows a qualifying CPU layer takes a fast path; the native kernel from NATIVE_MIN
# rows on (below that its 3-row weight tiles are load-bound and MKL's transposed product wins).
SMALL_M = 256
NATIVE_MIN = 8

LoraTerms = list[tuple[torch.Tensor, torch.Tensor, float]]


def unhooked(module: nn.Module) -> bool:
    """No forward (pre-)hooks and no accelerate hook: calling its math directly skips nothing."""
    # accelerate's hook is a plain attribute (module.__dict__), so no nn.Module.__getattr__ miss
    return not module._forward_hooks and not module._forward_pre_hooks and "_hf_hook" not in module.__dict__


def _plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and unhooked(module)


def lora_terms(module: nn.Module) -> LoraTerms | None:
    """[(A [r, in], B [out, r], scaling)] of the active adapters of an unmerged, vanilla peft LoRA
    ``Linear`` over a plain ``nn.Linear`` (no DoRA or other variant, no LoRA bias, dropout off),
    or None when the layer is anything else and must be called as a module."""
    cls = type(module)
    if cls.__name__ != "Linear" or not cls.__module__.startswith("peft.tuners.lora"):
        return None
    base = getattr(module, "base_layer", None)
    if base is None or not _plain_linear(base) or not unhooked(module) or getattr(module, "merged", True):
        return None
    if getattr(module, "fan_in_fan_out", False) or getattr(module, "lora_variant", None):
        return None
    if module.disable_adapters:
        return []
    terms = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        lora_a, lora_b, dropout = module.lora_A[name], module.lora_B[name], module.lora_dropout[name]
        if not (_plain_linear(lora_a) and _plain_linear(lora_b)) or lora_b.bias is not None or lora_a.bias is not None:
            return None
        if dropout.training and type(dropout) is not nn.Identity:
            return None
        adapter_dtypes = {lora_a.weight.dtype, lora_b.weight.dtype}
        if adapter_dtypes != {base.weight.dtype} and not _fp32_over_bf16(base.weight.dtype, adapter_dtypes):
            return None
        terms.append((lora_a.weight, lora_b.weight, float(module.scaling[name])))
    return terms


def _fp32_over_bf16(base_dtype: torch.dtype, adapter_dtypes: set[torch.dtype]) -> bool:
    """peft's default for a bf16 model (autocast_adapter_dtype): fp32 adapters over a bf16 base."""
    return base_dtype == torch.bfloat16 and adapter_dtypes == {torch.float32}


class Parts(NamedTuple):
    """How module(x) is computed on a fast path: base nn.Linear, active LoRA terms, and facts
    about their weights that do not depend on x."""

    base: nn.Linear
    terms: LoraTerms
    dtype: torch.dtype  # the base weight's (x's, on a fast path)
    contiguous: bool  # every weight contiguous (the native kernel reads them in place)
    # fp32 adapters over a bf16 base: the terms' checked native arguments (cpu_ops.lora_args)
    # when the native kernel can add them, [] when torch must; None when the dtypes are one.
    mixed: list | None = None


def _compute_parts(module: nn.Module) -> Parts | None:
    if _plain_linear(module):
        base, terms = module, []
    else:
        terms = lora_terms(module)
        base = None if terms is None else module.base_layer
    if base is None:
        return None
    weights = [base.weight] + [w for a, b, _ in terms for w in (a, b)]
    contiguous = all(w.is_contiguous() for w in weights)
    mixed = None
    if any(a.dtype != base.weight.dtype for a, _, _ in terms):
        native = contiguous and base.weight.device.type == "cpu" and cpu_ops.available()
        mixed = cpu_ops.lora_args("lora", terms, base.in_features, base.out_features) if native else []
    return Parts(base, terms, base.weight.dtype, contiguous, mixed)


def _mixed(x: torch.Tensor, parts: Parts, packed: torch.Tensor | None = None) -> torch.Tensor:
    """module(x) for fp32 adapters over a bf16 base, as peft computes it: the base product in bf16
    (F.linear, as the base layer, or the same from its packed weight), then
    bf16(float(y) + sum_i s_i (float(x) A_i^T) B_i^T); the adapter terms in one native call where
    it runs, else in torch's ops, peft's order."""
    base = parts.base
    out = _base_product(x, base, packed)  # [M, N] bf16
    if parts.mixed and x.stride(1) == 1:
        return cpu_ops.lora_add_bf16_checked_(out, x, parts.mixed)
    result, x32 = out, x.float()
    for weight_a, weight_b, scaling in parts.terms:
        result = result + torch.nn.functional.linear(torch.nn.functional.linear(x32, weight_a), weight_b) * scaling
    return result.to(out.dtype)


def _prefill_product(x: torch.Tensor, parts: Parts) -> torch.Tensor:
    """module(x) = x W^T + b on oneDNN (grpo_fast.onednn_gemm: MKL's fp32 GEMM runs its AVX2
    kernels on AMD CPUs), then each adapter's s (x A^T) B^T added in (peft's order)."""
    out = onednn_gemm.linear(x, parts.base.weight, parts.base.bias)  # [M, N]
    for weight_a, weight_b, scaling in parts.terms:
        out.addmm_(onednn_gemm.linear(x, weight_a), weight_b.t(), alpha=scaling)
    return out


def _base_product(x: torch.Tensor, base: nn.Linear, packed: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b [M, N]: from the packed weight when given (F.linear bit for bit), else F.linear."""
    if packed is None:
        return torch.nn.functional.linear(x, base.weight, base.bias)
    return onednn_gemm.linear(x, packed, base.bias)


def _packing_available() -> bool:
    """oneDNN's packed linear is in this torch build (CPU builds with mkldnn) and not switched off."""
    return os.environ.get("GRPO_FAST_NO_PACKED_WEIGHTS") != "1" and onednn_gemm.in_torch()


# The row count oneDNN picks the packed layout for: a decode step's (B x G = 32 here); any other
# count still runs on it, bit for bit the same.
PACK_ROWS_HINT = 32


def _pack(base: nn.Linear) -> torch.Tensor | None:
    """base's bf16 CPU weight in oneDNN's blocked layout (a copy), or None where it is not one."""
    w = base.weight
    if w.dtype != torch.bfloat16 or w.device.type != "cpu" or not w.is_contiguous() or not _packing_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_ROWS_HINT)
    except (RuntimeError, AttributeError):  # an older torch without the reorder op, or a build without it
        return None


def _native(x: torch.Tensor, parts: Parts) -> bool:
    return (parts.contiguous and x.dtype == torch.float32 and x.shape[0] >= NATIVE_MIN and x.stride(1) == 1
            and cpu_ops.available())


def _native_into(out: torch.Tensor, x: torch.Tensor, parts: Parts, accumulate: bool) -> torch.Tensor:
    """out (+)= x W^T + b + sum_i s_i (x A_i^T) B_i^T in one native call."""
    bias = parts.base.bias.contiguous() if parts.base.bias is not None else None
    return cpu_ops.linear_into(out, x, parts.base.weight, bias, accumulate=accumulate, lora=parts.terms)


def _transposed(parts, xt: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
    """module(x)^T = W @ x^T + b + sum_i s_i * B_i @ (A_i @ x^T): xt [K, M] -> [N, M]. fp32 terms
    over a bf16 base (``_transposed_mixed_ok``) are added by the native kernel, reading x [M, K]
    rows where given, else xt as it lies."""
    return _transposed_many([parts], xt, x)[0]


def _transposed_many(parts_list: list[Parts], xt: torch.Tensor, x: torch.Tensor | None = None) -> list[torch.Tensor]:
    """[_transposed(parts, xt, x) for parts in parts_list] (modules of one input: q, k, v; gate,
    up), the fp32-over-bf16 adapters of all of them added in one native call."""
    outs_t, mixed = [], []
    for parts in parts_list:
        base = parts.base
        if base.bias is None:
            out_t = torch.mm(base.weight, xt)  # [N, M]
        else:  # b + W x^T in one op: F.linear's one rounding (mm, then + b, rounds twice in bf16)
            out_t = torch.addmm(base.bias.unsqueeze(1), base.weight, xt)
        if parts.mixed:
            mixed.append((out_t, parts.mixed))
        else:
            for weight_a, weight_b, scaling in parts.terms:
                out_t.addmm_(weight_b, torch.mm(weight_a, xt), alpha=scaling)  # += s * B @ (A @ x^T)
        outs_t.append(out_t)
    if mixed:
        given, transposed = (x, False) if x is not None else (xt, True)
        cpu_ops.lora_add_bf16_t_checked_([o for o, _ in mixed], given, transposed, [a for _, a in mixed])
    return outs_t


def _transposed_mixed_ok(parts: Parts) -> bool:
    """Whether ``_transposed`` computes module(x) as the module does: no fp32-over-bf16 terms, or
    terms the native kernel can add (not [], which means torch's ops: ``_mixed``)."""
    return parts.mixed is None or bool(parts.mixed)


def _native_bf16_rows(*tensors: torch.Tensor) -> bool:
    """Whether cpu_ops.transpose_bf16 takes these: bf16 CPU matrices with unit-stride rows."""
    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.stride(1) == 1 for t in tensors) and \
        cpu_ops.available()


def _rows(out_t: torch.Tensor) -> torch.Tensor:
    """out_t [N, M] (a product computed transposed) as [M, N] contiguous rows: natively for bf16
    on the CPU (torch's transposing copy is slow for 2-byte elements), else torch's copy."""
    if _native_bf16_rows(out_t):
        out = torch.empty(out_t.shape[1], out_t.shape[0], dtype=torch.bfloat16)
        return cpu_ops.transpose_bf16_checked(out_t, out, False)
    return out_t.t().contiguous()


def _add_rows_(into: torch.Tensor, out_t: torch.Tensor) -> torch.Tensor:
    """into [M, N] += out_t [N, M] transposed, in place, rounded as torch's add."""
    if _native_bf16_rows(out_t, into):
        return cpu_ops.transpose_bf16_checked(out_t, into, True)
    # (a strided add of out_t.t() ran at a third of a copy + dense add: 39 vs 13 µs at 32 x 576 bf16)
    return into.add_(out_t.t().contiguous())


def _fused_silu_gate(mlp: nn.Module, x: torch.Tensor, gate: Parts, up: Parts) -> bool:
    """Whether silu(gate(x)) * up(x) may be one native pass: SiLU activation, no bias (adapters
    are computed inside the pass)."""
    plain = all(p.base.bias is None for p in (gate, up))
    act = mlp.act_fn
    return plain and type(act).__name__ in SILU_ACTIVATIONS and unhooked(act) and _native(x, gate) and _native(x, up)


class FastPaths:
    """The module-dependent fast paths, with a memo of each module's path facts (type, hooks,
    active adapters, weight layout). Within ``scope()`` they are checked once per module and
    remembered: the checks were the bulk of a decode step's Python time (~10 per layer, each a
    few attribute lookups through nn.Module). A sampler's generate call is one scope: nothing
    toggles adapters or swaps weights in the middle of it; weight values are still read at call
    time. Outside a scope nothing is remembered."""

    def __init__(self):
        # (id(module), what) -> (module, value) within a scope; None outside one.
        self._memo: dict[tuple[int, str], tuple[nn.Module, object]] | None = None

    @contextmanager
    def scope(self):
        outer, self._memo = self._memo, {}
        try:
            yield self
        finally:
            self._memo = outer

    def memoized(self, module: nn.Module, what: str, compute):
        """compute(), remembered for `module` until the current scope ends (not at all outside one)."""
        if self._memo is None:
            return compute()
        key = (id(module), what)
        hit = self._memo.get(key)
        if hit is not None and hit[0] is module:
            return hit[1]
        value = compute()
        self._memo[key] = (module, value)
        return value

    def parts(self, module: nn.Module) -> Parts | None:
        """How `module` is computed on a fast path (whatever x), or None: call it as a module."""
        return self.memoized(module, "parts", lambda: _compute_parts(module))

    def packed(self, parts: Parts) -> torch.Tensor | None:
        """parts.base's weight packed for oneDNN (``_pack``) for the rest of the scope; None outside
        a scope (packing per call would cost more than it saves) or where it does not apply."""
        if self._memo is None:
            return None
        return self.memoized(parts.base, "packed", lambda: _pack(parts.base))

    def _packs(self, parts: list[Parts], x: torch.Tensor) -> bool:
        """Whether every module of `parts` computes module(x) from its packed weight: bf16, plain or
        fp32 adapters over the bf16 base (peft's default), within a scope."""
        return (x.dtype == torch.bfloat16 and all(not p.terms or p.mixed is not None for p in parts)
                and all(self.packed(p) is not None for p in parts))

    def _packed_rows(self, parts: Parts, x: torch.Tensor) -> torch.Tensor:
        """module(x) [M, N] from the packed weight (``_packs`` said yes), adapters added into the rows."""
        packed = self.packed(parts)
        return _mixed(x, parts, packed) if parts.terms else _base_product(x, parts.base, packed)

    def fast_parts(self, module: nn.Module, x: torch.Tensor) -> Parts | None:
        """How module(x) may take a CPU fast path, else None."""
        if x.device.type != "cpu" or x.dim() != 2 or x.shape[0] > SMALL_M:
            return None
        parts = self.parts(module)
        return parts if parts is not None and parts.dtype == x.dtype else None

    def prefill_parts(self, module: nn.Module, x: torch.Tensor) -> Parts | None:
        """How module(x) is computed on oneDNN for more than SMALL_M fp32 CPU rows (a prefill):
        a plain linear or LoRA with adapters of the base's dtype, else None (call the module)."""
        if x.device.type != "cpu" or x.dim() != 2 or x.shape[0] <= SMALL_M or torch.is_grad_enabled():
            return None  # (oneDNN's op has no gradient of its own: without grad mode only)
        parts = self.parts(module)
        ok = parts is not None and parts.mixed is None and onednn_gemm.wants(x, parts.base.weight)
        return parts if ok else None

    def linear(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """module(x) [M, N]."""
        parts = self.fast_parts(module, x)
        if parts is None:
            prefill = self.prefill_parts(module, x)
            return module(x) if prefill is None else _prefill_product(x, prefill)
        if self._packs([parts], x):
            return self._packed_rows(parts, x)
        if parts.mixed is not None:
            if self._transposable([parts], x):  # W x^T, as the plain bf16 model's path
                return _rows(_transposed(parts, x.t(), x))
            return _mixed(x, parts)
        if _native(x, parts):
            out = torch.empty(x.shape[0], parts.base.out_features, dtype=x.dtype)
            return _native_into(out, x, parts, accumulate=False)
        return _rows(_transposed(parts, x.t()))

    def linears(self, modules: tuple[nn.Module, ...], x: torch.Tensor) -> list[torch.Tensor]:
        """[m(x) for m in modules] (a layer's q, k, v projections); natively as one call when all of
        them qualify, each module's LoRA terms computed inside it."""
        parts = [self.fast_parts(m, x) for m in modules]
        if not all(p is not None and _native(x, p) for p in parts):
            if all(p is not None for p in parts) and self._packs(parts, x):
                return [self._packed_rows(p, x) for p in parts]
            if all(p is not None and p.mixed is not None for p in parts) and self._transposable(parts, x):
                # fp32 adapters over a bf16 base: W x^T as the plain bf16 model's path, every adapter in one call
                return [_rows(o) for o in _transposed_many(parts, x.t(), x)]
            return [self.linear(m, x) for m in modules]
        biases = [None if p.base.bias is None else p.base.bias.contiguous() for p in parts]
        return cpu_ops.linear_many(x, [p.base.weight for p in parts], biases, [p.terms for p in parts])

    def linear_add_(self, into: torch.Tensor, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """into += module(x), in place (into [M, N] fp32 rows, e.g. the residual stream)."""
        parts = self.fast_parts(module, x)
        if parts is not None and _native(x, parts) and into.dtype == x.dtype and into.stride(1) == 1:
            return _native_into(into, x, parts, accumulate=True)
        if parts is not None and self._packs([parts], x):
            return into.add_(self._packed_rows(parts, x))
        if parts is not None and x.dtype == torch.bfloat16 and self._transposable([parts], x):
            return _add_rows_(into, _transposed(parts, x.t(), x))  # W x^T added in as it is transposed back
        return into.add_(self.linear(module, x))

    def lm_head(self, module: nn.Module, x: torch.Tensor, rows_per_chunk: int = 4096) -> torch.Tensor:
        """Logits [M, V] fp32. On the transposed path the [V, M] product is made a vocabulary chunk
        at a time and each chunk transposed into place while it is still in cache (one transposing
        copy of the whole [V, M] product reads it with a stride of M floats). A bf16 head within a
        scope takes its packed weight instead (3.3 vs 4.3 ms a step for SmolLM2's, the reorder 28
        ms a scope)."""
        parts = self.fast_parts(module, x)
        if parts is not None and self._packs([parts], x):
            return self._packed_rows(parts, x).float()
        if parts is None or parts.terms or _native(x, parts):
            return self.linear(module, x).float()
        base = parts.base
        xt = x.t()  # [H, M]
        vocab = base.weight.shape[0]
        out = torch.empty(x.shape[0], vocab, dtype=x.dtype, device=x.device)  # [M, V]
        for s in range(0, vocab, rows_per_chunk):
            e = min(s + rows_per_chunk, vocab)
            if base.bias is None:
                chunk = torch.mm(base.weight[s:e], xt)  # [C, M]
            else:  # (one op: F.linear's one rounding)
                chunk = torch.addmm(base.bias[s:e].unsqueeze(1), base.weight[s:e], xt)
            out[:, s:e] = chunk.t()
        return out.float()

    def gated_mlp_add_(self, into: torch.Tensor, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """into += mlp(x), in place. The known gated MLPs are unrolled so their projections take the
        fast paths; on the transposed path the whole MLP runs transposed (act(G x^T) * (U x^T) is
        [I, M], contiguous, and is already the x^T the down projection wants)."""
        parts = self._gated_parts(mlp, x)
        if parts is None:
            if self._gated_parts(mlp, x, prefill=True) is None:
                return into.add_(mlp(x))
            return self._gated_by_projections_(into, mlp, x)  # a prefill: each projection on oneDNN
        gate, up, down = parts
        if _native(x, gate) and _native(x, up):
            return self.linear_add_(into, mlp.down_proj, self._gated_inner(mlp, x, gate, up))
        if self._packs(parts, x):  # rows throughout: act(x G^T) * (x U^T) [M, I] is down's input as it lies
            inner = mlp.act_fn(self._packed_rows(gate, x)).mul_(self._packed_rows(up, x))
            return into.add_(self._packed_rows(down, inner))
        if any(p.mixed is not None for p in parts) and not self._transposable(parts, x):
            return self._gated_by_projections_(into, mlp, x)
        xt = x.t()  # [H, M]
        # (fp32 adapters over a bf16 base: gate's and up's terms read x's rows, down's inner_t as it lies)
        gate_t, up_t = _transposed_many([gate, up], xt, x)
        inner_t = mlp.act_fn(gate_t).mul_(up_t)  # [I, M]
        return _add_rows_(into, _transposed(down, inner_t))

    def _gated_by_projections_(self, into: torch.Tensor, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """into += down(act(gate(x)) * up(x)), each projection by ``linear``, in rows."""
        inner = mlp.act_fn(self.linear(mlp.gate_proj, x)).mul_(self.linear(mlp.up_proj, x))  # [M, I]
        return into.add_(self.linear(mlp.down_proj, inner))

    @staticmethod
    def _transposable(parts: list[Parts], x: torch.Tensor) -> bool:
        """Whether every module of `parts` may run as W x^T with its adapters added after it
        (``_transposed_mixed_ok``), x's rows read in place by the native add."""
        return all(_transposed_mixed_ok(p) for p in parts) and x.stride(1) == 1

    def _gated_parts(self, mlp: nn.Module, x: torch.Tensor, prefill: bool = False):
        """The gate, up and down projections' parts on the fast paths (on oneDNN's with `prefill`),
        or None where any of them has none (or the MLP is not a known gated one)."""
        if type(mlp).__name__ not in GATED_MLPS or not unhooked(mlp):
            return None
        parts_of = self.prefill_parts if prefill else self.fast_parts
        parts = [parts_of(m, x) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
        return None if any(p is None for p in parts) else parts

    def _gated_inner(self, mlp: nn.Module, x: torch.Tensor, gate: Parts, up: Parts) -> torch.Tensor:
        """act(gate(x)) * up(x) [M, I] on the native kernels."""
        if _fused_silu_gate(mlp, x, gate, up):
            return cpu_ops.silu_mul_linear(x, gate.base.weight, up.base.weight, lora_gate=gate.terms, lora_up=up.terms)
        return mlp.act_fn(self.linear(mlp.gate_proj, x)).mul_(self.linear(mlp.up_proj, x))


_NATIVE_NORM_DTYPES = (torch.float32, torch.bfloat16)


def native_norm(norm: nn.Module) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of one of the families' RMSNorms with a contiguous fp32 or bf16 weight,
    unhooked (the native kernel computes it as the module does), else None: call it as a module."""
    if type(norm).__name__ not in RMS_NORMS or not unhooked(norm):
        return None
    w = norm.weight
    return (w, float(norm.variance_epsilon)) if w.dtype in _NATIVE_NORM_DTYPES and w.is_contiguous() else None


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """norm(x) over the last dim; natively for the families' RMSNorms on contiguous fp32 or bf16
    CPU input of the weight's dtype (any leading shape: Qwen3's per-head q/k norms see [T, H, D])."""
    params = native_norm(norm)
    if (params is None or x.device.type != "cpu" or x.dtype != params[0].dtype or not x.is_contiguous()
            or not cpu_ops.available()):
        return norm(x)
    return cpu_ops.rms_norm(x, *params)


class Rotary:
    """Applies one forward's RoPE to each layer's q, k: x * cos + rotate_half(x) * sin (HF's
    convention: halves, not interleaved pairs). cos, sin [T, D] from the model's own rotary
    module, so every RoPE-scaling variant is whatever transformers computes."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        self.cos, self.sin = cos.contiguous(), sin.contiguous()  # [T, D]
        # fp32, or bf16 (a bf16 model's cos / sin: the kernel rounds where torch's bf16 ops do)
        self.native = (cos.device.type == "cpu" and cos.dtype in (torch.float32, torch.bfloat16)
                       and sin.dtype == cos.dtype and cpu_ops.available())
        self._broadcast = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hkv, D] -> rotated (new tensors)."""
        if self.native and q.dtype == k.dtype == self.cos.dtype and q.is_contiguous() and k.is_contiguous():
            return cpu_ops.rope_qk(q, k, self.cos, self.sin)
        if self._broadcast is None:
            # [T, 1, D] to broadcast over heads; the sign of rotate_half folded into sin's first half.
            half = self.sin.shape[-1] // 2
            signed = torch.cat((-self.sin[:, :half], self.sin[:, half:]), dim=-1)
            self._broadcast = self.cos.unsqueeze(1), signed.unsqueeze(1)
        cos, sin = self._broadcast
        return _rope(q, cos, sin), _rope(k, cos, sin)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x*cos + rotate_half(x)*sin, rotate_half(x) = cat(-x2, x1): written as
    cat(x2, x1) * cat(-sin1, sin2) to save the negation."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, swapped, sin_signed)
