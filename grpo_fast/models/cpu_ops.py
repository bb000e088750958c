"""CPU kernels of the sampler's decode step: few-row fp32 linear layers (csrc/linear_cpu.cpp),
RMSNorm (csrc/rms_norm_cpu.cpp), RoPE (csrc/rope_cpu.cpp) and a whole decoder layer
(csrc/decode_layer_cpu.cpp).

``linear(x, W, b)`` = x @ W^T + b for x [M, K] with M a few dozen rows, the weight read in place
(no copy, no packing of the weight), AVX2+FMA, 58-67 GFLOPS here against MKL's 44-54 at M = 32
(MKL repacks the weight on every call, an extra pass over a matrix that is read once). Also
``linear_into`` (written into, or accumulated into, an existing [M, N] view, with a scale:
residual adds and LoRA's s * (x A^T) B^T), ``linear_many`` (several weights over one x: q, k,
v) and ``silu_mul_linear`` (a gated MLP's silu(x Wg^T) * (x Wu^T) in one pass).

``rms_norm(x, w, eps)`` = w * x / sqrt(mean(x^2, -1) + eps) in one pass per row (HF's RMSNorm
module runs seven tensor ops, each a few microseconds of dispatch on a [32, 576] tensor).

``lora_add_bf16_(out, x, lora)``: peft's fp32 LoRA terms added into a bf16 base product in one
call (torch runs ~8 ops), as peft computes them (csrc/lora_bf16_cpu.cpp).

``transpose_bf16(src_t, into=None)``: a bf16 product computed transposed (W x^T) back into rows,
copied or added into the residual stream (torch: ~9 and ~39 µs at 576 x 32).

``rope_qk(q, k, cos, sin)``: HF's rotary embedding of q and k in one call (torch: ~8 ops a layer).

``DecodeModel`` / ``decode_layers``: a whole decoder stack of a decode step in one call, LoRA
adapters included (grpo_fast.models.native_decode).

LoRA: ``lora=[(A [r, K], B [N, r], scale), ...]`` on the linear kernels adds scale * (x A^T) B^T
inside the same call (x packed once, A x as extra packed rows, B as one more pass over them into
the same output tile), from the adapters' live weights.

Threads: the kernels run on their own pool (csrc/parallel.h) sized by torch.get_num_threads().

``available()`` says whether they can run (the native build is there and the CPU has AVX2+FMA);
callers keep a torch path for when it is False. Summation order differs from MKL's, so results
agree with ``x @ W.T`` to fp32 rounding, not bitwise.
"""

from __future__ import annotations

import os

import torch

from grpo_fast import checks
from grpo_fast.native import _C

_BUILT_AND_SUPPORTED = _C is not None and hasattr(_C, "cpu_linear") and bool(_C.cpu_linear_available())
_F32 = (torch.float32,)
_BF16 = (torch.bfloat16,)


def available() -> bool:
    """True when the native kernels can run here (GRPO_FAST_NO_CPU_LINEAR=1 turns them off)."""
    return _BUILT_AND_SUPPORTED and os.environ.get("GRPO_FAST_NO_CPU_LINEAR") != "1"


def _rows_apart(t: torch.Tensor) -> int:
    """Elements from one row of the 2-D t to the next, as the kernels read it: stride(0), or the
    row's length where there is one row (whose stride torch leaves arbitrary: a [1, K] transpose of
    a column has stride 1)."""
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _check_rows(name: str, t: torch.Tensor) -> None:
    """[M, K] fp32 rows, each dense (a column slice of a wider matrix is fine)."""
    checks.tensor(name, t, ndim=2, dtypes=_F32, device="cpu", contiguous=False, unit_stride=True)


def _check_weight(name: str, w: torch.Tensor, k: int) -> None:
    checks.tensor(name, w, ndim=2, dtypes=_F32, device="cpu")
    if w.shape[1] != k:
        raise ValueError(f"{name}: has {w.shape[1]} input features, x has {k}")


def _check_bias(name: str, b: torch.Tensor | None, n: int) -> None:
    if b is not None:
        checks.tensor(name, b, dtypes=_F32, shape=(n,))


LoraTerms = list[tuple[torch.Tensor, torch.Tensor, float]]  # [(A [r, K], B [N, r], scaling)]


def lora_args(name: str, lora: LoraTerms | None, k: int, n: int) -> list[tuple[int, int, int, float]]:
    """Checked LoRA terms as the kernels take them: (A pointer, B pointer, r, scale)."""
    out = []
    for i, (a, b, scale) in enumerate(lora or ()):
        checks.tensor(f"{name}[{i}] A", a, ndim=2, dtypes=_F32, device="cpu")
        r = a.shape[0]
        checks.tensor(f"{name}[{i}] B", b, dtypes=_F32, device="cpu", shape=(n, r))
        if a.shape[1] != k or r < 1:
            raise ValueError(f"{name}[{i}]: A is {tuple(a.shape)}, need [r >= 1, {k}]")
        out.append((a.data_ptr(), b.data_ptr(), r, float(scale)))
    return out


def linear_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                *, alpha: float = 1.0, accumulate: bool = False, lora: LoraTerms | None = None) -> torch.Tensor:
    """out = (out if accumulate else 0) + alpha * (x @ weight^T + sum_l s_l (x A_l^T) B_l^T) + bias;
    x [M, K], weight [N, K], out [M, N] (rows may be strided, e.g. a column slice). Returns out."""
    _check_rows("x", x)
    _check_rows("out", out)
    _check_weight("weight", weight, x.shape[1])
    m, n = x.shape[0], weight.shape[0]
    if tuple(out.shape) != (m, n):
        raise ValueError(f"out: expected shape {(m, n)}, got {tuple(out.shape)}")
    _check_bias("bias", bias, n)
    terms = lora_args("lora", lora, x.shape[1], n)
    if m:
        _C.cpu_linear(out.data_ptr(), x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                      m, n, x.shape[1], _rows_apart(x), _rows_apart(out), float(alpha), bool(accumulate), terms)
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           lora: LoraTerms | None = None) -> torch.Tensor:
    """x @ weight^T + LoRA(x) + bias as a new [M, N] tensor."""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    return linear_into(out, x, weight, bias, lora=lora)


def linear_many(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                loras: list[LoraTerms | None] | None = None) -> list[torch.Tensor]:
    """[x @ w^T + LoRA_i(x) + b for w, b in zip(weights, biases)] in one call (x packed once, one
    parallel pass over all the weights' rows): a layer's q, k and v projections."""
    _check_rows("x", x)
    if len(weights) != len(biases) or not weights:
        raise ValueError(f"weights ({len(weights)}) and biases ({len(biases)}): need equal, non-zero lengths")
    loras = loras if loras is not None else [None] * len(weights)
    if len(loras) != len(weights):
        raise ValueError(f"loras ({len(loras)}): need one (or None) per weight ({len(weights)})")
    outs, terms = [], []
    for i, (w, b) in enumerate(zip(weights, biases)):
        _check_weight(f"weights[{i}]", w, x.shape[1])
        _check_bias(f"biases[{i}]", b, w.shape[0])
        terms.append(lora_args(f"loras[{i}]", loras[i], x.shape[1], w.shape[0]))
        outs.append(torch.empty(x.shape[0], w.shape[0], dtype=torch.float32))
    if x.shape[0]:
        _C.cpu_linear_many([o.data_ptr() for o in outs], x.data_ptr(), [w.data_ptr() for w in weights],
                           [0 if b is None else b.data_ptr() for b in biases], [w.shape[0] for w in weights],
                           [_rows_apart(o) for o in outs], x.shape[0], x.shape[1], _rows_apart(x), terms)
    return outs


def silu_mul_linear(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, *, lora_gate: LoraTerms | None = None,
                    lora_up: LoraTerms | None = None) -> torch.Tensor:
    """silu(x @ w_gate^T + LoRA_g(x)) * (x @ w_up^T + LoRA_u(x)), [M, N], both projections bias-free."""
    _check_rows("x", x)
    _check_weight("w_gate", w_gate, x.shape[1])
    _check_weight("w_up", w_up, x.shape[1])
    if w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate {tuple(w_gate.shape)} and w_up {tuple(w_up.shape)} differ in shape")
    m, n = x.shape[0], w_gate.shape[0]
    gate_terms = lora_args("lora_gate", lora_gate, x.shape[1], n)
    up_terms = lora_args("lora_up", lora_up, x.shape[1], n)
    out = torch.empty(m, n, dtype=torch.float32)
    if m:
        _C.cpu_silu_mul_linear(out.data_ptr(), x.data_ptr(), w_gate.data_ptr(), w_up.data_ptr(),
                               m, n, x.shape[1], _rows_apart(x), _rows_apart(out), gate_terms, up_terms)
    return out


def lora_add_bf16_(out: torch.Tensor, x: torch.Tensor, lora: LoraTerms) -> torch.Tensor:
    """out = bf16(float(out) + sum_l s_l (float(x) A_l^T) B_l^T), in place: peft's fp32 adapters
    (its default over a bf16 base) added into the bf16 base product out = x W^T + b, as peft's
    forward computes them. x [M, K] and out [M, N] bf16 rows (may be strided), A [r, K] and
    B [N, r] fp32. Returns out."""
    checks.tensor("x", x, ndim=2, dtypes=_BF16, device="cpu", contiguous=False, unit_stride=True)
    checks.tensor("out", out, ndim=2, dtypes=_BF16, device="cpu", contiguous=False, unit_stride=True)
    m, n = out.shape
    if x.shape[0] != m:
        raise ValueError(f"out has {m} rows, x has {x.shape[0]}")
    return lora_add_bf16_checked_(out, x, lora_args("lora", lora, x.shape[1], n))


def lora_add_bf16_checked_(out: torch.Tensor, x: torch.Tensor, args: list[tuple[int, int, int, float]]) -> torch.Tensor:
    """lora_add_bf16_ with the terms already checked (``lora_args``) and x, out known to be bf16
    CPU rows of matching shapes: a decode step's per-call path, its checks done once per scope."""
    if out.shape[0] and args:
        _C.cpu_lora_add_bf16(out.data_ptr(), x.data_ptr(), out.shape[0], out.shape[1], x.shape[1], _rows_apart(x),
                             _rows_apart(out), args)
    return out


def lora_add_bf16_t_(out_t: torch.Tensor, lora: LoraTerms, *, x: torch.Tensor | None = None,
                     xt: torch.Tensor | None = None) -> torch.Tensor:
    """lora_add_bf16_ into a transposed base product, in place: out_t [N, M] = W x^T (+ b), bf16,
    gets bf16(float(out_t) + sum_l s_l B_l (A_l x^T)). The input as x [M, K] rows or as xt = x^T
    [K, M] (a transposed MLP's activations, which feed its down projection as they lie); exactly
    one of the two. Returns out_t."""
    return lora_add_bf16_t_many_([out_t], [lora], x=x, xt=xt)[0]


def lora_add_bf16_t_many_(outs_t: list[torch.Tensor], loras: list[LoraTerms], *, x: torch.Tensor | None = None,
                          xt: torch.Tensor | None = None) -> list[torch.Tensor]:
    """lora_add_bf16_t_ for several transposed products of the same input (a layer's q, k, v) in
    one call: the input read once, every adapter's A x^T in one pass, the outputs' sums in one
    parallel pass. Returns outs_t."""
    if (x is None) == (xt is None):
        raise ValueError("pass exactly one of x [M, K] and xt [K, M]")
    if len(outs_t) != len(loras) or not outs_t:
        raise ValueError(f"outs_t ({len(outs_t)}) and loras ({len(loras)}): need equal, non-zero lengths")
    given = x if x is not None else xt
    checks.tensor("x" if x is not None else "xt", given, ndim=2, dtypes=_BF16, device="cpu", contiguous=False,
                  unit_stride=True)
    k = given.shape[1] if x is not None else given.shape[0]
    rows = given.shape[0] if x is not None else given.shape[1]
    args = []
    for i, (out_t, lora) in enumerate(zip(outs_t, loras)):
        name = "out_t" if len(outs_t) == 1 else f"outs_t[{i}]"
        checks.tensor(name, out_t, ndim=2, dtypes=_BF16, device="cpu", contiguous=False, unit_stride=True)
        if out_t.shape[1] != rows:
            raise ValueError(f"{name} has {out_t.shape[1]} columns (rows of x), the input has {rows} rows")
        args.append(lora_args("lora" if len(outs_t) == 1 else f"loras[{i}]", lora, k, out_t.shape[0]))
    lora_add_bf16_t_checked_(outs_t, given, x is None, args)
    return outs_t


def lora_add_bf16_t_checked_(outs_t: list[torch.Tensor], given: torch.Tensor, transposed: bool,
                             args: list[list[tuple[int, int, int, float]]]) -> None:
    """lora_add_bf16_t_many_ with the terms already checked (``lora_args``, one list per output):
    the decode's per-call path. given is x [M, K] or, with transposed, x^T [K, M]."""
    m = given.shape[1] if transposed else given.shape[0]
    if m and any(args):
        k = given.shape[0] if transposed else given.shape[1]
        _C.cpu_lora_add_bf16_t([o.data_ptr() for o in outs_t], [o.shape[0] for o in outs_t],
                               [_rows_apart(o) for o in outs_t], given.data_ptr(), m, k, _rows_apart(given),
                               transposed, args)


def transpose_bf16(src_t: torch.Tensor, *, into: torch.Tensor | None = None) -> torch.Tensor:
    """src_t [N, M] bf16 (rows of unit stride) as [M, N] rows: a new contiguous tensor
    (src_t.t().contiguous(), bitwise), or added into `into` [M, N] in place (into += src_t.t(),
    rounded as torch's bf16 add). Returns the result."""
    checks.tensor("src_t", src_t, ndim=2, dtypes=_BF16, device="cpu", contiguous=False, unit_stride=True)
    n, m = src_t.shape
    if into is None:
        out = torch.empty(m, n, dtype=torch.bfloat16)
    else:
        out = checks.tensor("into", into, shape=(m, n), dtypes=_BF16, device="cpu", contiguous=False,
                            unit_stride=True)
    return transpose_bf16_checked(src_t, out, into is not None)


def transpose_bf16_checked(src_t: torch.Tensor, out: torch.Tensor, accumulate: bool) -> torch.Tensor:
    """transpose_bf16 with src_t and out [M, N] known to be bf16 CPU rows of matching shapes (the
    decode's per-call path: its checks cost as much as the copy)."""
    n, m = src_t.shape
    if m and n:
        _C.cpu_transpose_bf16(out.data_ptr(), src_t.data_ptr(), m, n, _rows_apart(out), _rows_apart(src_t), accumulate)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2 over the last dim) + eps), any leading shape; fp32, or bf16 as
    HF's module computes it in bf16 (bf16(weight * bf16(x * r)), the sum of squares in fp32)."""
    checks.tensor("x", x, dtypes=(torch.float32, torch.bfloat16), device="cpu")
    if x.dim() < 1:
        raise ValueError("x: need at least one dim")
    dim = x.shape[-1]
    checks.tensor("weight", weight, dtypes=(x.dtype,), shape=(dim,))
    out = torch.empty_like(x)
    if x.numel():
        kernel = _C.cpu_rms_norm if x.dtype == torch.float32 else _C.cpu_rms_norm_bf16
        kernel(out.data_ptr(), x.data_ptr(), weight.data_ptr(), x.numel() // dim, dim, float(eps))
    return out


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) * cos + rotate_half((q, k)) * sin, rotate_half(x) = cat(-x2, x1) over the halves of
    the head dim; q [T, Hq, D], k [T, Hkv, D], cos/sin [T, D], all contiguous, all fp32 or all
    bf16 (then each op rounded as torch's bf16 ops round it: HF's result bit for bit)."""
    dtypes = (torch.float32, torch.bfloat16)
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        checks.tensor(name, t, dtypes=dtypes, device="cpu")
    if len({q.dtype, k.dtype, cos.dtype, sin.dtype}) != 1:
        raise ValueError(f"q, k, cos, sin: need one dtype, got {q.dtype}, {k.dtype}, {cos.dtype}, {sin.dtype}")
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[2] % 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: need [T, H, D] with the same T and an even D")
    t, d = q.shape[0], q.shape[2]
    if cos.shape != (t, d) or sin.shape != (t, d):
        raise ValueError(f"cos {tuple(cos.shape)} / sin {tuple(sin.shape)}: need [{t}, {d}]")
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if t:
        kernel = _C.cpu_rope_qk if q.dtype == torch.float32 else _C.cpu_rope_qk_bf16
        kernel(q_out.data_ptr(), k_out.data_ptr(), q.data_ptr(), k.data_ptr(), cos.data_ptr(), sin.data_ptr(),
               t, q.shape[1], k.shape[1], d)
    return q_out, k_out


def decode_model(hidden: int, intermediate: int, num_q_heads: int, num_kv_heads: int, head_dim: int):
    """An empty native decoder stack (_C.CpuDecodeModel); ``add_layer(pointers, eps, lora)`` appends
    a layer: the 13 weight pointers of csrc/decode_layer_cpu.h (0 = no bias), the two norm eps,
    and 7 lists (q, k, v, o, gate, up, down) of LoRA terms as ``lora_args`` returns them."""
    return _C.CpuDecodeModel(hidden, intermediate, num_q_heads, num_kv_heads, head_dim)


def decode_layers(model, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                  step, head_dim: int) -> None:
    """Every layer of `model` (a decode_model) over hidden [M, H] in place; kv_cache
    [L, 2, num_blocks, block_size, Hkv, D] fp32 contiguous; step: a kv.decode_step.DecodeStep
    over it (its cascade groups, if any, are used)."""
    checks.tensor("hidden", hidden, ndim=2, dtypes=_F32, device="cpu")
    m = hidden.shape[0]
    checks.tensor("cos", cos, dtypes=_F32, shape=(m, head_dim))
    checks.tensor("sin", sin, dtypes=_F32, shape=(m, head_dim))
    checks.tensor("kv_cache", kv_cache, ndim=6, dtypes=_F32, device="cpu")
    num_layers, _, nb, bs = kv_cache.shape[:4]
    if num_layers < model.num_layers:
        raise ValueError(f"kv_cache: {num_layers} layers, the model has {model.num_layers}")
    if step.dtype != torch.float32 or step.q_shape[0] != m or step.cache_shape != tuple(kv_cache.shape[2:]):
        raise ValueError(f"step: built for {step.q_shape} {step.dtype} queries over {step.cache_shape} caches; "
                         f"this call has {m} rows over {tuple(kv_cache.shape[2:])}")
    layer_bytes = kv_cache[0, 0].numel() * kv_cache.element_size()
    rows, starts, prefix = step.groups if step.groups is not None else (None, None, None)
    _C.cpu_decode_layers(model, hidden.data_ptr(), m, cos.data_ptr(), sin.data_ptr(), kv_cache.data_ptr(),
                         layer_bytes, step.slots.data_ptr(), step.tables.data_ptr(), step.lens.data_ptr(),
                         step.tables.shape[1], nb, bs, float(step.scale),
                         0 if rows is None else rows.data_ptr(), 0 if starts is None else starts.data_ptr(),
                         0 if prefix is None else prefix.data_ptr(), 0 if prefix is None else prefix.shape[0])
