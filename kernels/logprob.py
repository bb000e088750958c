"""Host launchers of the fused log-prob kernels: z = transform(h @ W.T + b), never as [N, V].

The transform (grpo_fast.loss.head) is z = s y / T, or z = c tanh(s y / c) / T with a soft cap c.

    logprob_forward  -> logp[t] = z[t, y_t] - lse[t],  lse[t] = logsumexp_v z[t, v],
                        entropy[t] = lse[t] - sum_v softmax(z_t)_v z[t, v]
    logprob_backward -> grad_hidden = dy @ W, grad_weight = dy^T @ h, grad_bias = sum_t dy[t],
                        dy = d(sum_t grad_logp[t] logp[t] + grad_entropy[t] entropy[t]) / dy
    logprob_forward_input_grad -> the forward plus D = d logp / d hidden = (s/T)(W[y] - p @ W)
                        (no soft cap; the entropy gradient takes the logprob_backward path)

Tensors are CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 (tests). All statistics are
fp32 whatever the input dtype. The kernels live in logprob_fwd.py / logprob_bwd.py (see their
docstrings for the tiling), the per-arch tile tables in _config.py, the list of everything a
launcher can build in logprob_specs.py (the compile test's input).

Matmul count per training step, in units of N*V*H: a trainable head costs forward 1 +
backward 4 (dh: recomputed logits + dz @ W; dW: recomputed logits + dz^T @ h; the dW kernel
recomputes rather than share dz through memory or atomics, see logprob_bwd.py). A frozen head
(need_grad_weight=False) launches no dW kernel and allocates no [V, H] buffer: 1 + 2 with
logprob_backward, or 2 in total with logprob_forward_input_grad, whose backward is elementwise
(grpo_fast.loss.logprob_function uses it when only hidden needs a gradient, there is no soft cap
and the entropy needs no gradient; with the entropy bonus a frozen head costs 1 + 2 here, as many
matmuls as a fused D' = d entropy / d hidden would). Which is faster on a
given GPU is for benchmarks/bench_loss.py to show; no GPU was available when this was written.
"""
import contextlib
import math
import os

import torch
import triton

from grpo_fast import checks

from ._config import INTERPRET_CONFIG, TileConfig, num_v_splits, select_config
from .logprob_bwd import logprob_bwd_dh_kernel, logprob_bwd_dw_kernel
from .logprob_fwd import logprob_fwd_kernel

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INTERPRET_NUM_SMS = 4  # pretend SM count under the interpreter, so V splits get exercised


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's own matmul setting: TF32 only if the user allowed it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"  # exact fp32 dot; ignored for bf16/fp16 operands


def _device_info(device: torch.device) -> tuple:
    """(compute capability as 86 etc., SM count)."""
    if device.type != "cuda":
        return 0, INTERPRET_NUM_SMS
    props = torch.cuda.get_device_properties(device)
    return props.major * 10 + props.minor, props.multi_processor_count


def _on_device(device: torch.device):
    """Launch on the tensors' GPU, not the current one (multi-GPU hosts)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _config(kind, device, dtype, n_rows, config):
    if config is not None:
        return config
    if device.type != "cuda":
        return INTERPRET_CONFIG
    return select_config(kind, _device_info(device)[0], dtype.itemsize, n_rows)


def _split_range(n_v: int, block_v: int, splits: int) -> tuple:
    """(splits, v_per_split): whole tiles per split, no split empty."""
    tiles = triton.cdiv(n_v, block_v)
    splits = max(1, min(splits, tiles))
    v_per_split = triton.cdiv(tiles, splits) * block_v
    return triton.cdiv(n_v, v_per_split), v_per_split


def _transform_args(temperature: float, logit_scale: float, softcap):
    """(pre, post) of the kernels' transform (see _logprob_tiles)."""
    for name, v in (("logit_scale", logit_scale),) + ((("softcap", softcap),) if softcap is not None else ()):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a finite float > 0, got {v!r}")
    if softcap is None:
        return float(logit_scale) / float(temperature), 1.0
    return float(logit_scale) / float(softcap), float(softcap) / float(temperature)


def _validate_common(hidden, weight, bias, targets, temperature):
    checks.tensor("hidden", hidden, ndim=2, dtypes=_DTYPES)
    dev = hidden.device
    if dev.type != "cuda" and not interpreting():
        raise ValueError(f"hidden is on {dev}: the Triton kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1); use grpo_fast.ops for the CPU path")
    checks.tensor("weight", weight, ndim=2, dtypes=(hidden.dtype,), device=dev)
    n, h = hidden.shape
    if weight.shape[1] != h or weight.shape[0] == 0:
        raise ValueError(f"weight must be [V >= 1, H={h}], got {tuple(weight.shape)}")
    if h == 0:
        raise ValueError("hidden must have H >= 1 columns")
    if bias is not None:
        checks.tensor("bias", bias, ndim=1, dtypes=(weight.dtype,), device=dev)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    checks.tensor("targets", targets, ndim=1, dtypes=(torch.int64,), device=dev)
    if targets.shape[0] != n:
        raise ValueError(f"targets must be [N={n}], got {tuple(targets.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")


def logprob_forward(hidden, weight, bias, targets, temperature: float, compute_entropy: bool,
                    *, logit_scale: float = 1.0, softcap: float = None, config: TileConfig = None,
                    v_splits: int = None):
    """Log-prob of `targets` under softmax(transform(hidden @ weight.T + bias)).

    hidden [N, H], weight [V, H] (same dtype: fp32/bf16/fp16), bias [V] or None, targets [N]
    int64. Returns (logp [N], lse [N], entropy [N] or None), all fp32. A target outside
    [0, V) gives logp = NaN (checked on device, no host sync). `config` / `v_splits` override
    the launcher's choice (tests, tuning).
    """
    return _forward(hidden, weight, bias, targets, temperature, compute_entropy, False,
                    config, v_splits, logit_scale, softcap)[:3]


def logprob_forward_input_grad(hidden, weight, bias, targets, temperature: float,
                               compute_entropy: bool, *, logit_scale: float = 1.0,
                               config: TileConfig = None, v_splits: int = None):
    """logprob_forward plus D = d logp / d hidden = (s/T)(W[y] - softmax(z) @ W), [N, H] fp32.

    For a frozen head: the backward is then grad_hidden = grad_logp[:, None] * D, and the
    whole step costs two matmuls of N*V*H instead of three. Rows with a bad target get NaN.
    """
    return _forward(hidden, weight, bias, targets, temperature, compute_entropy, True,
                    config, v_splits, logit_scale, None)


def _forward(hidden, weight, bias, targets, temperature, compute_entropy, input_grad, config,
             v_splits, logit_scale, softcap):
    _validate_common(hidden, weight, bias, targets, temperature)
    pre, post = _transform_args(temperature, logit_scale, softcap)
    n, h = hidden.shape
    n_v = weight.shape[0]
    dev = hidden.device
    if n == 0:
        empty = torch.empty(0, device=dev, dtype=torch.float32)
        ent = empty.clone() if compute_entropy else None
        grad = torch.empty(0, h, device=dev, dtype=torch.float32) if input_grad else None
        return empty, empty.clone(), ent, grad
    cfg = _config("fwd_grad" if input_grad else "fwd", dev, hidden.dtype, n, config)
    row_blocks = triton.cdiv(n, cfg.block_n)
    if v_splits is None:
        v_splits = num_v_splits(row_blocks, triton.cdiv(n_v, cfg.block_v), _device_info(dev)[1])
        if input_grad:
            v_splits = _cap_hidden_partials(v_splits, n_v, h)
    splits, v_per_split = _split_range(n_v, cfg.block_v, v_splits)
    part = torch.empty(4 if compute_entropy else 3, splits, n, device=dev, dtype=torch.float32)
    # E partials [S, N, H]: zero so that the first tile's alpha * E is 0, not 0 * garbage
    e_part = torch.zeros(splits, n, h, device=dev, dtype=torch.float32) if input_grad else part
    with _on_device(dev):
        logprob_fwd_kernel[(row_blocks, splits)](
            hidden, weight, bias if bias is not None else hidden, targets, part, e_part,
            n, n_v, h, v_per_split, pre, post,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            COMPUTE_ENTROPY=bool(compute_entropy), INPUT_GRAD=bool(input_grad),
            UPCAST_DOT=interpreting(), DOT_PRECISION=_dot_precision(hidden.dtype),
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    logp, lse, entropy = combine_partials(part, compute_entropy)
    bad = (targets < 0) | (targets >= n_v)  # [N] bool, on device: no sync
    logp = torch.where(bad, torch.full_like(logp, float("nan")), logp)
    grad = None
    if input_grad:
        # E / s over all splits: sum_s exp(m_s - M) E_s / sum_s exp(m_s - M) s_s
        w = torch.exp(part[0] - part[0].max(dim=0).values)  # [S, N]
        expected = (w[:, :, None] * e_part).sum(dim=0) / (w * part[1]).sum(dim=0)[:, None]  # [N, H]
        w_y = weight[targets.clamp(0, n_v - 1)].float()  # [N, H]
        grad = (w_y - expected) * pre  # pre = s / T without a soft cap
        grad = torch.where(bad[:, None], torch.full_like(grad, float("nan")), grad)
    return logp, lse, entropy, grad


def _cap_hidden_partials(v_splits: int, n_v: int, h: int) -> int:
    """Each split holds an [N, H] fp32 partial: keep them under 1/8 of the [N, V] fp32 logits."""
    return max(1, min(v_splits, n_v // (8 * h)))


def combine_partials(part: torch.Tensor, compute_entropy: bool):
    """Merge per-split (m, s, zy[, a]) [k, S, N] into (logp, lse, entropy) [N].

    With M = max_s m_s and w_s = exp(m_s - M): S = sum w_s s_s, lse = M + log S,
    A = sum w_s (a_s + s_s (m_s - M)) (re-centring each a_s on M), entropy = log S - A / S.
    """
    m, s, zy = part[0], part[1], part[2]  # [S, N] each
    big_m = m.max(dim=0).values  # [N]
    w = torch.exp(m - big_m)  # [S, N]
    total = (w * s).sum(dim=0)
    log_total = torch.log(total)
    lse = big_m + log_total
    logp = zy.sum(dim=0) - lse
    entropy = None
    if compute_entropy:
        a = (w * (part[3] + s * (m - big_m))).sum(dim=0)
        entropy = log_total - a / total
    return logp, lse, entropy


def logprob_backward(hidden, weight, bias, targets, lse, grad_logp, temperature: float,
                     need_grad_weight: bool, need_grad_bias: bool, *, logit_scale: float = 1.0,
                     softcap: float = None, entropy=None, grad_entropy=None,
                     config_dh: TileConfig = None, config_dw: TileConfig = None,
                     v_splits: int = None):
    """Gradients of sum_t grad_logp[t] * logp[t] (+ grad_entropy[t] * entropy[t] when given,
    with `entropy` [N] fp32 from the forward), with `lse` [N] fp32 from the forward.

    Returns (grad_hidden [N, H] in hidden.dtype, grad_weight [V, H] fp32 or None,
    grad_bias [V] fp32 or None). Rows whose gradients are all 0 cost (almost) nothing.
    """
    _validate_common(hidden, weight, bias, targets, temperature)
    pre, post = _transform_args(temperature, logit_scale, softcap)
    n, h = hidden.shape
    n_v = weight.shape[0]
    dev = hidden.device
    entropy_grad = grad_entropy is not None
    named = [("lse", lse), ("grad_logp", grad_logp)]
    if entropy_grad:
        if entropy is None:
            raise ValueError("grad_entropy needs the forward's entropy")
        named += [("entropy", entropy), ("grad_entropy", grad_entropy)]
    for name, t in named:
        checks.tensor(name, t, ndim=1, dtypes=(torch.float32,), device=dev)
        if t.shape[0] != n:
            raise ValueError(f"{name} must be [N={n}], got {tuple(t.shape)}")
    if need_grad_bias and bias is None:
        raise ValueError("need_grad_bias=True but bias is None")
    upcast, precision = interpreting(), _dot_precision(hidden.dtype)
    grad_weight = torch.zeros(n_v, h, device=dev, dtype=torch.float32) if need_grad_weight else None
    grad_bias = torch.empty(n_v, device=dev, dtype=torch.float32) if need_grad_bias else None
    if n == 0:
        if grad_bias is not None:
            grad_bias.zero_()
        return torch.empty_like(hidden), grad_weight, grad_bias
    b_arg = bias if bias is not None else hidden
    ent_arg = entropy if entropy_grad else grad_logp
    gent_arg = grad_entropy if entropy_grad else grad_logp
    flags = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, ENTROPY_GRAD=entropy_grad,
                 UPCAST_DOT=upcast, DOT_PRECISION=precision)

    cfg = _config("bwd_dh", dev, hidden.dtype, n, config_dh)
    row_blocks = triton.cdiv(n, cfg.block_n)
    if v_splits is None:
        v_splits = num_v_splits(row_blocks, triton.cdiv(n_v, cfg.block_v), _device_info(dev)[1])
        v_splits = _cap_hidden_partials(v_splits, n_v, h)
    splits, v_per_split = _split_range(n_v, cfg.block_v, v_splits)
    dh_part = torch.zeros(splits, n, h, device=dev, dtype=torch.float32)  # [S, N, H]
    with _on_device(dev):
        logprob_bwd_dh_kernel[(row_blocks, splits)](
            hidden, weight, b_arg, targets, lse, grad_logp, ent_arg, gent_arg, dh_part, n, n_v, h,
            v_per_split, pre, post, **flags,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    grad_hidden = dh_part[0] if splits == 1 else dh_part.sum(dim=0)  # [N, H] fp32
    grad_hidden = grad_hidden.to(hidden.dtype)

    if need_grad_weight or need_grad_bias:
        cfg = _config("bwd_dw", dev, hidden.dtype, n, config_dw)
        with _on_device(dev):
            logprob_bwd_dw_kernel[(triton.cdiv(n_v, cfg.block_v),)](
                hidden, weight, b_arg, targets, lse, grad_logp, ent_arg, gent_arg,
                grad_weight if need_grad_weight else dh_part,
                grad_bias if need_grad_bias else dh_part, n, n_v, h, pre, post, **flags,
                NEED_DW=bool(need_grad_weight), NEED_DB=bool(need_grad_bias),
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return grad_hidden, grad_weight, grad_bias
