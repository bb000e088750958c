"""Argument checks for the KV ops: a bad tensor is a ValueError naming the argument, never a
segfault in the native code (which trusts sizes, strides and dtypes)."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def tensor(name: str, t, *, ndim: int | None = None, dtypes=None, device=None,
           shape: tuple | None = None) -> torch.Tensor:
    """Check one tensor. shape entries that are None are free."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if shape is not None:
        for i, want in enumerate(shape):
            if want is not None and t.shape[i] != want:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}; dim {i} must be {want}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return t


def cache_pair(key_cache, value_cache):
    """Both caches [num_blocks, block_size, Hkv, D], same dtype/device/shape. Returns the shape."""
    tensor("key_cache", key_cache, ndim=4, dtypes=FLOAT_DTYPES)
    tensor("value_cache", value_cache, ndim=4, dtypes=(key_cache.dtype,), device=key_cache.device,
           shape=tuple(key_cache.shape))
    if key_cache.device.type == "cpu" and key_cache.dtype == torch.float16:
        raise ValueError("key_cache: float16 is supported on CUDA only; use float32 or bfloat16 on CPU")
    return tuple(key_cache.shape)


def scalar_float(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{name} must be a float, got {type(x).__name__}")
    x = float(x)
    if not x > 0.0 or x != x or x == float("inf"):
        raise ValueError(f"{name} must be a finite positive float, got {x}")
    return x
