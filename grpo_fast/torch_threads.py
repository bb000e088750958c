"""Setting torch's CPU thread count without its side effect on MKL.

`torch.set_num_threads(n)` also calls `mkl_set_dynamic(false)` (PyTorch's ParallelOpenMP.cpp: so
that MKL does not resize the OpenMP team between MKL and non-MKL regions), for the rest of the
process. With MKL's dynamic adjustment off, every MKL call, however small, runs on all of
torch's threads; on a 2-core machine the libgomp threads of those small regions then spin
(~300k iterations) after each, on the cores the sampler's own thread pool (csrc/parallel.cpp)
needs. Measured (benchmarks/RESULTS.md, "The sampler after the first training phase"): the
trainer's thread governor set the thread count around every micro-batch, and from the second
GRPO step on the sampler decoded 25% slower than in the first step (313-334 vs 439 tok/s);
calling `torch.set_num_threads(torch.get_num_threads())` once before sampling reproduces it,
switching MKL's dynamic mode back on undoes it.

`set_torch_threads` therefore calls torch only when the count changes, and then switches MKL's
dynamic mode back on (MKL's own default) through the MKL that libtorch_cpu carries, unless the
user asked for it off with MKL_DYNAMIC=FALSE. Without MKL (other platforms, other BLAS builds) it
is `torch.set_num_threads`.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch


@functools.cache
def _libtorch_cpu() -> ctypes.CDLL | None:
    """The libtorch_cpu this process loaded (dlopen returns the same handle), if it carries MKL."""
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        path = os.path.join(lib_dir, name)
        if os.path.exists(path):
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                return None
            return lib if hasattr(lib, "MKL_Set_Dynamic") else None
    return None


def mkl_dynamic() -> bool | None:
    """MKL's dynamic mode (True: MKL may run a small call on fewer threads); None without MKL or
    without MKL's (internal) getter."""
    lib = _libtorch_cpu()
    getter = getattr(lib, "mkl_serv_get_dynamic", None) if lib is not None else None
    if getter is None:
        return None
    getter.restype = ctypes.c_int
    return bool(getter())


def _user_wants_mkl_static() -> bool:
    return os.environ.get("MKL_DYNAMIC", "").strip().upper() in ("FALSE", "0", "NO", "OFF")


def set_torch_threads(n: int) -> None:
    """torch.set_num_threads(n) when n differs from torch's count, keeping MKL's dynamic mode on
    (see the module docstring); no call at all when it does not differ."""
    if n == torch.get_num_threads():
        return
    torch.set_num_threads(n)
    lib = _libtorch_cpu()
    if lib is not None and not _user_wants_mkl_static():
        lib.MKL_Set_Dynamic(ctypes.c_int(1))  # C interface: void MKL_Set_Dynamic(int)
