"""The native core (grpo_fast._C) seen from Python: which build is there, and which kernels run
for a tensor's device.

CPU tensors use the `cpu_*` functions (OpenMP), CUDA tensors the `cuda_*` ones, which take the
current stream's handle as their last argument. ``native_for(t, op)`` is None when only the
plain-PyTorch reference can run `op` on t's device: no native build (a source checkout), a
device the core does not serve, or GRPO_FAST_KV_REFERENCE=1 (debugging: the reference
everywhere).
"""
from __future__ import annotations

import contextlib
import os

import torch

try:
    from grpo_fast import _C
except ImportError:  # source checkout without a build
    _C = None

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # csrc/common.h: DType


def dtype_code(t: torch.Tensor) -> int:
    return _DTYPE_CODES[t.dtype]


class Backend:
    """The `cpu_*` or `cuda_*` functions of _C: ``backend.append_kv(...)`` calls ``_C.cuda_append_kv``."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.cuda = prefix == "cuda_"

    def __getattr__(self, name):
        return getattr(_C, self.prefix + name)

    def stream_args(self, t: torch.Tensor) -> tuple:
        """The trailing stream argument of a CUDA launch (none on the CPU)."""
        if self.cuda:
            return (torch.cuda.current_stream(t.device).cuda_stream,)
        return ()


_CPU, _CUDA = Backend("cpu_"), Backend("cuda_")


def _reference_forced() -> bool:
    return _C is None or os.environ.get("GRPO_FAST_KV_REFERENCE") == "1"


def native_for(t: torch.Tensor, op: str) -> Backend | None:
    """The backend that runs `op` on t's device, or None when only the reference can."""
    if _reference_forced():
        return None
    b = _CUDA if t.device.type == "cuda" else _CPU if t.device.type == "cpu" else None
    if b is None or not hasattr(_C, b.prefix + op):
        return None
    return b


def has_native(op: str, device: str = "cpu") -> bool:
    """Whether `op` runs native code for tensors on `device` ("cpu" or "cuda")."""
    if _reference_forced():
        return False
    return hasattr(_C, ("cuda_" if device.startswith("cuda") else "cpu_") + op)


class _CpuDtypeKernels:
    """The `cpu_*` functions for one dtype: ``k.rms_norm_backward(...)`` calls
    ``_C.cpu_rms_norm_backward`` (fp32) or ``_C.cpu_rms_norm_backward_bf16`` (bf16)."""

    def __init__(self, suffix: str):
        self.suffix = suffix

    def __getattr__(self, name):
        return getattr(_C, f"cpu_{name}{self.suffix}")


_LEAN_SUFFIX = {torch.float32: "", torch.bfloat16: "_bf16"}
_LEAN = {dtype: _CpuDtypeKernels(suffix) for dtype, suffix in _LEAN_SUFFIX.items()}


def cpu_lean_backend(op: str, *tensors: torch.Tensor) -> _CpuDtypeKernels | None:
    """The CPU core's one-pass kernels for these tensors' dtype, when it has `op` for it and every
    tensor is a contiguous CPU tensor of one dtype, fp32 or bf16 (what the training pass's lean
    kernels take); else None (the caller runs its PyTorch ops)."""
    dtype = tensors[0].dtype
    if dtype not in _LEAN or any(t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return None
    if native_for(tensors[0], op + _LEAN_SUFFIX[dtype]) is None:
        return None
    return _LEAN[dtype]


@contextlib.contextmanager
def openmp_regions(enabled: bool = True):
    """The calling thread's CPU kernel regions on libgomp's team (torch's) instead of the kernels'
    own pool, for the duration: for code that runs torch ops between our kernels (csrc/parallel.h
    says why). A build without the switch: as is."""
    switch = getattr(_C, "cpu_set_openmp_regions", None) if _C is not None else None
    if switch is None or not enabled:
        yield
        return
    was = switch(True)
    try:
        yield
    finally:
        switch(was)
