"""A competing CPU-bound process for the "under load" benchmarks (bench_sampler, bench_step).

    with busy("python"):   # or "torch", or "none"
        ...measure...

"python": one process spinning a pure-Python loop (one core's worth of demand, what a reward
function, a tool or a data loader doing CPU work looks like). "torch": one process running 256 x
256 fp32 matmuls on one torch thread. Both run at nice 19 in their own session (setsid), as a
job started from another terminal does: with Linux's autogroup scheduling (on here:
/proc/sys/kernel/sched_autogroup_enabled = 1) niceness only orders processes *within* a session,
so across sessions the competitor still gets a fair share of the cores. The benchmark records
which competitor ran and the autogroup setting.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager

KINDS = ("none", "python", "torch")

# Each competitor stops by itself once the benchmark that started it is gone (its parent pid
# changes): a benchmark killed by a signal skips busy()'s cleanup and must not leave it spinning.
_WATCH = "import os\nparent = os.getppid()\n"
_CODE = {
    "python": _WATCH + "while os.getppid() == parent:\n    for _ in range(1_000_000):\n        pass\n",
    "torch": (_WATCH + "import torch\ntorch.set_num_threads(1)\na = torch.randn(256, 256)\n"
              "while os.getppid() == parent:\n    for _ in range(100):\n        a = torch.tanh(a @ a)\n"),
}


def describe(kind: str) -> str:
    if kind == "none":
        return "nothing else running"
    what = "a pure-Python busy loop" if kind == "python" else "a 1-thread torch matmul loop"
    return f"beside {what} (1 process, nice 19, its own session; autogroup={autogroup()})"


def autogroup() -> str:
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            return f.read().strip()
    except OSError:
        return "n/a"


@contextmanager
def busy(kind: str = "python"):
    """Run one competing process (see the module docstring) for the duration of the block."""
    if kind not in KINDS:
        raise ValueError(f"busy: one of {KINDS}, got {kind!r}")
    if kind == "none":
        yield None
        return
    proc = subprocess.Popen([sys.executable, "-c", _CODE[kind]], preexec_fn=lambda: os.nice(19),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # let it start (and torch import) before the measurement
        yield proc
    finally:
        proc.kill()
        proc.wait()
