"""Argument checks for every op that takes tensors: a bad argument is a ValueError that names it
and says what was wanted and what came, never a segfault in native code (which trusts sizes,
strides and dtypes) nor a shape error three calls deeper.

    tensor("key", key, dtypes=(cache.dtype,), device=cache.device, shape=(None, hkv, d))
    -> ValueError: key: need a contiguous bf16 [?, 2, 64] tensor on cpu, got fp32 (5, 2, 64) on cpu

Shape entries: an int is required, None or a label ("V") is free (labels only show in messages).
`exact` is the same check as a few comparisons, for per-layer calls in a decode step.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
          torch.int32: "int32", torch.int64: "int64", torch.bool: "bool"}


def dtype_name(dtype: torch.dtype) -> str:
    return _SHORT.get(dtype, str(dtype).replace("torch.", ""))


def tensor(name: str, t, *, ndim: int | None = None, dtypes: Sequence[torch.dtype] | None = None,
           floating: bool = False, device=None, shape: Sequence | None = None, contiguous: bool = True,
           unit_stride: bool = False) -> torch.Tensor:
    """Check one tensor argument; returns it. ndim: number of dims (implied by shape); dtypes:
    allowed dtypes; floating: any floating-point dtype; device: required device; contiguous:
    required (the default, native code reads raw memory); unit_stride: only the last dim must
    be dense (row views of a matrix)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if shape is not None:
        ndim = len(shape)
    device = None if device is None else torch.device(device)
    ok = ((ndim is None or t.dim() == ndim)
          and (dtypes is None or t.dtype in dtypes)
          and (not floating or t.is_floating_point())
          and (device is None or t.device == device)
          and (shape is None or all(not isinstance(w, int) or t.shape[i] == w for i, w in enumerate(shape)))
          and (not contiguous or t.is_contiguous())
          and (not unit_stride or not _strided_rows(t)))
    if not ok:
        raise ValueError(_mismatch(name, t, ndim, dtypes, floating, device, shape, contiguous, unit_stride))
    return t


def exact(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype) -> None:
    """A contiguous tensor of exactly this shape and dtype (device checked once by the caller):
    the per-call check of hot paths, a few integer comparisons."""
    if t.shape != shape or t.dtype != dtype or not t.is_contiguous():
        tensor(name, t, dtypes=(dtype,), shape=shape)


def positive_float(name: str, x) -> float:
    """A finite float > 0 (ints accepted, bools not)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{name} must be a float, got {type(x).__name__}")
    x = float(x)
    if not (x > 0.0 and math.isfinite(x)):
        raise ValueError(f"{name} must be a finite positive float, got {x}")
    return x


def _strided_rows(t: torch.Tensor) -> bool:
    """Whether the last dim has a stride other than 1 that matters (a dim of size 0 or 1 has none
    to speak of: a [N, 1] transpose of a row is still N dense rows)."""
    return t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1


def _mismatch(name, t, ndim, dtypes, floating, device, shape, contiguous, unit_stride) -> str:
    want = ["a"]
    if contiguous:
        want.append("contiguous")
    if shape is None and ndim is not None:
        want.append(f"{ndim}-D")
    if dtypes is not None:
        want.append("/".join(dtype_name(d) for d in dtypes))
    elif floating:
        want.append("floating-point")
    if shape is not None:
        want.append("[" + ", ".join("?" if w is None else str(w) for w in shape) + "]")
    want.append("tensor")
    if device is not None:
        want.append(f"on {device}")
    if unit_stride:
        want.append("with unit column stride")
    got = f"{dtype_name(t.dtype)} {tuple(t.shape)} on {t.device}"
    if contiguous and not t.is_contiguous() or unit_stride and _strided_rows(t):
        got += f" with strides {t.stride()}"
    return f"{name}: need {' '.join(want)}, got {got}"
