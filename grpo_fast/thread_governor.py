"""How many torch CPU threads the training passes and the sampler use: as many as the cores
other processes leave free, measured during the previous micro-batch (training) or over the last
quarter second or more of decode steps (sampling: `phase` and `tick`).

Why: torch's CPU kernels run on libgomp, whose parallel regions end in a barrier every team
thread must reach, and whose waiting threads spin (~300k iterations) before they sleep. Beside
another busy process a team thread is often descheduled; its peers spin at the barrier, burning
the core it needs, at every one of the thousands of short regions of a forward + backward. On 2
cores beside one busy process a training pass of SmolLM2 + LoRA took 23x its idle time with 2
threads, and with 1 thread the time 1 thread takes idle, 1.4x the 2-thread idle time
(benchmarks/RESULTS.md, "Training beside a busy process"). `OMP_WAIT_POLICY=PASSIVE` avoids the
collapse too but costs ~25% idle, and must be set before torch loads, which a library imported
after torch cannot do.

Probing the other thread count to find out (timing both) costs too much here: one probe with
the wrong count under load is a 23x micro-batch. So the load is *measured* instead: the CPU time
every process spent on this process's allowed cores (/proc/stat, per core) minus this process's
own, over the micro-batch's wall time (and over the gap since the previous one: a sampling phase,
say), is how many cores others took. The next micro-batch runs on the cores left (rounded down,
with 0.2 of a core of slack for background noise), at least 1, at most torch's thread count. A
load that comes or goes is followed one micro-batch later (a load that starts during a training
phase costs that one micro-batch). Torch's thread count is restored after each block, so the
sampler (whose own pool, csrc/parallel.cpp, adapts per region) and everything else keep torch's
setting. The count is set through `grpo_fast.torch_threads.set_torch_threads`: plain
`torch.set_num_threads` also switched MKL's dynamic mode off for good, and the sampler decoded 25%
slower from the second step on (see that module).

Not on Linux (no /proc/stat): torch's thread count, unchanged.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from contextlib import contextmanager, nullcontext

import torch

from grpo_fast.torch_threads import set_torch_threads

SLACK_CORES = 0.2  # others' use below this counts as idle (kernel threads, the tracker, ...)
MIN_WALL_S = 0.2  # shorter blocks: too few clock ticks (10 ms each) to measure others' use


def read_proc_stat(path: str = "/proc/stat") -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def busy_seconds(stat_text: str, cpus: set[int], ticks_per_s: float) -> float:
    """CPU seconds spent busy (user, nice, system, irq, softirq, steal) on `cpus`, from the text of
    /proc/stat (its per-core `cpuN` lines)."""
    total = 0
    for line in stat_text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        if int(name[3:]) not in cpus:
            continue
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        total += user + nice + system + irq + softirq + steal
    return total / ticks_per_s


class LoadMeter:
    """Cores that other processes used on this process's cores between start() and stop()."""

    def __init__(self, read=read_proc_stat, clock=time.perf_counter, own_cpu_s=None):
        self.read, self.clock = read, clock
        self.own_cpu_s = own_cpu_s or (lambda: sum(os.times()[:2]))  # this process, every thread
        self.cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        self.ticks_per_s = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
        # the last reading: from creation on, so the first block already sees what ran before it
        # (a trainer makes its governor before the first sampling phase)
        self._start, self._stop = None, self._reading()
        self.available = self._stop is not None

    def _reading(self):
        text = self.read()
        return None if text is None else (busy_seconds(text, self.cpus, self.ticks_per_s), self.own_cpu_s(),
                                          self.clock())

    @staticmethod
    def _others(first, last) -> float | None:
        if first is None or last is None or last[2] - first[2] < MIN_WALL_S:
            return None
        return max(0.0, ((last[0] - first[0]) - (last[1] - first[1])) / (last[2] - first[2]))

    def start(self) -> float | None:
        """Begin an interval; returns others' cores since the last stop() (the gap between two
        measured blocks: a sampling phase, say), None if unmeasurable."""
        self._start = self._reading()
        return self._others(self._stop, self._start)

    def stop(self) -> float | None:
        """Others' cores over the interval; None if unmeasurable (no /proc/stat, too short)."""
        self._stop = self._reading()
        return self._others(self._start, self._stop)

    def lap(self) -> float | None:
        """Others' cores since start() or the last lap that returned a value, once at least
        MIN_WALL_S have passed (a new interval then begins); None before that, without reading
        /proc/stat (a caller may lap at every short step)."""
        if self._start is None or self.clock() - self._start[2] < MIN_WALL_S:
            return None
        reading = self._reading()
        others = self._others(self._start, reading)
        self._start = reading
        return others


class ThreadGovernor:
    """Runs each block on the cores others left free during the last measured interval: the
    previous block, or the time since it (a sampling phase between two training phases) when that
    was long enough to measure."""

    def __init__(self, max_threads: int | None = None, meter: LoadMeter | None = None):
        self.max_threads = max_threads or torch.get_num_threads()
        self.meter = meter or LoadMeter()
        self.choice = self.max_threads
        self.others: float | None = None  # cores others used in the last measured block
        self.last: int | None = None  # the thread count of the last block
        self._in_phase = False
        self.blocks: Counter[int] = Counter()  # thread count -> blocks run with it

    @property
    def enabled(self) -> bool:
        return self.max_threads > 1 and self.meter.available

    def threads_for(self, others: float) -> int:
        free = len(self.meter.cpus) - others
        return max(1, min(self.max_threads, math.floor(free + SLACK_CORES)))

    @contextmanager
    def measure(self):
        """Run the block on the chosen thread count; measure others' load meanwhile for the next
        block's choice. Torch's thread count is restored after."""
        if not self.enabled:
            yield
            return
        self._learn(self.meter.start())  # a load that came or went since the last block
        before = torch.get_num_threads()
        self._use(self.choice)
        try:
            yield
        finally:
            set_torch_threads(before)
        self._learn(self.meter.stop())

    @contextmanager
    def phase(self):
        """A phase of many short blocks (the sampler's decode steps: 10-100 ms each, too few clock
        ticks to measure one by one) on the chosen thread count. Call tick() between blocks: once
        MIN_WALL_S or more have passed, others' load over that window sets the count for the next
        blocks. A bf16 sampler, whose GEMMs are torch's (libgomp), took ~40x its idle time beside
        one busy process on 2 threads, 1.3x on 1 (benchmarks/RESULTS.md). Torch's count is
        restored after."""
        with self.measure():  # the phase as one block, its windows measured by tick()
            self._in_phase = True
            try:
                yield
            finally:
                self._in_phase = False

    def tick(self) -> None:
        """Between two blocks of a phase: follow the load of the window that just ended, if one did."""
        if not (self._in_phase and self.enabled):
            return
        others = self.meter.lap()
        if others is not None:
            self._learn(others)
            if self.choice != self.last:
                self._use(self.choice)

    def _use(self, threads: int) -> None:
        set_torch_threads(threads)  # no call when unchanged; MKL's dynamic mode kept on
        self.last = threads
        self.blocks[threads] += 1

    def _learn(self, others: float | None):
        if others is not None:
            self.others = others
            self.choice = self.threads_for(others)

    def describe(self) -> dict:
        return {"choice": self.choice, "others_cores": None if self.others is None else round(self.others, 2),
                "blocks_per_thread_count": dict(sorted(self.blocks.items()))}


def governor_for(threads, device: torch.device) -> ThreadGovernor | None:
    """What a `threads` argument (True, False or a ThreadGovernor) means on `device`: that
    governor; for True a new one on the CPU (None elsewhere: no libgomp to collapse); None for
    False. Anything else is refused by name."""
    if isinstance(threads, ThreadGovernor):
        return threads
    if not isinstance(threads, bool):
        raise ValueError(f"threads must be True, False or a ThreadGovernor, got {threads!r}")
    return ThreadGovernor() if threads and device.type == "cpu" else None


def paced(governor: ThreadGovernor | None):
    """The context one scoring / training micro-batch runs in: the governor's thread count;
    None: torch's, as is."""
    return nullcontext() if governor is None else governor.measure()
