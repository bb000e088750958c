"""Finds the native kernels in grpo_fast._C for a tensor's device (None: use the reference).

CPU tensors use the `cpu_*` functions (OpenMP), CUDA tensors the `cuda_*` ones, which take the
current stream's handle as their last argument. Set GRPO_FAST_KV_REFERENCE=1 to force the
plain-PyTorch reference everywhere (debugging).
"""
from __future__ import annotations

import os

import torch

try:
    from grpo_fast import _C
except ImportError:  # source checkout without a build
    _C = None

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dtype_code(t: torch.Tensor) -> int:
    return _DTYPE_CODES[t.dtype]


class _Backend:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.cuda = prefix == "cuda_"

    def __getattr__(self, name):
        return getattr(_C, self.prefix + name)

    def stream_args(self, t: torch.Tensor) -> tuple:
        if self.cuda:
            return (torch.cuda.current_stream(t.device).cuda_stream,)
        return ()

    def sample_workspace(self, logits: torch.Tensor):
        if self.cuda:  # per-row fp32 probabilities, reused by the filter passes
            return torch.empty_like(logits)
        return None


_CPU, _CUDA = _Backend("cpu_"), _Backend("cuda_")


def native_for(t: torch.Tensor, op: str):
    """The backend that runs `op` on t's device, or None when only the reference can."""
    if _C is None or os.environ.get("GRPO_FAST_KV_REFERENCE") == "1":
        return None
    b = _CUDA if t.device.type == "cuda" else _CPU if t.device.type == "cpu" else None
    if b is None or not hasattr(_C, b.prefix + op):
        return None
    return b


def has_native(op: str, device: str = "cpu") -> bool:
    """Whether `op` runs native code for tensors on `device` ("cpu" or "cuda")."""
    if _C is None or os.environ.get("GRPO_FAST_KV_REFERENCE") == "1":
        return False
    return hasattr(_C, ("cuda_" if device.startswith("cuda") else "cpu_") + op)
