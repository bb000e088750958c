"""The CPU kernels' thread pool (csrc/parallel.h): a region's chunks are claimed by whichever
threads are running, the caller included, so results cannot depend on how many threads took part
(each output is computed whole by one chunk: bitwise equal for 1 and 2 threads); the pool follows
torch.set_num_threads; calls from several Python threads at once and from a forked child work.
The speed under load is a benchmark's business (bench_sampler --load none,python)."""
import os
import signal
import threading

import numpy as np
import pytest
import torch

from grpo_fast import kv
from grpo_fast.models import cpu_ops
from grpo_fast.native import _C

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="native CPU kernels need AVX2+FMA")


def _kernels(g):
    x = torch.randn(40, 576, generator=g)
    w = torch.randn(1539, 576, generator=g)
    a, b = torch.randn(8, 576, generator=g), torch.randn(1539, 8, generator=g)
    q = torch.randn(24, 9, 64, generator=g)
    kc, vc = torch.randn(64, 16, 3, 64, generator=g), torch.randn(64, 16, 3, 64, generator=g)
    tables = torch.randperm(64, generator=g).int().view(8, 8).repeat(3, 1)[:24].contiguous()
    lens = torch.randint(1, 128, (24,), generator=g, dtype=torch.int32)

    def run():
        return (cpu_ops.linear(x, w, lora=[(a, b, 0.5)]), cpu_ops.silu_mul_linear(x, w, w),
                kv.paged_decode_attention(q, kc, vc, tables, lens, 0.125))
    return run


def test_results_do_not_depend_on_the_thread_count():
    run = _kernels(torch.Generator().manual_seed(0))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _C.cpu_threads() == 1
        one = run()
        torch.set_num_threads(2)
        assert _C.cpu_threads() == 2
        two = [run() for _ in range(3)]
    finally:
        torch.set_num_threads(old)
    for outs in two:
        for a, b in zip(one, outs):
            assert torch.equal(a, b)


def test_openmp_regions_give_the_same_results_and_are_the_calling_thread_s():
    """native.openmp_regions (the sampler's per-module path): the same kernels' regions on
    libgomp's team give bitwise the pool's results (each output is one chunk's); the switch is the
    calling thread's alone (another thread still sees the pool) and is restored after, nested too."""
    from grpo_fast.native import openmp_regions

    run = _kernels(torch.Generator().manual_seed(1))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        pool = run()
        with openmp_regions():
            team = run()
            other = []
            t = threading.Thread(target=lambda: other.append(_C.cpu_set_openmp_regions(False)))
            t.start()
            t.join()
            with openmp_regions():
                assert _C.cpu_set_openmp_regions(True) is True
            assert _C.cpu_set_openmp_regions(True) is True  # still on after the nested exit
        assert _C.cpu_set_openmp_regions(False) is False  # off again after
    finally:
        torch.set_num_threads(old)
    assert other == [False]
    for a, b in zip(pool, team):
        assert torch.equal(a, b)


def test_concurrent_callers_and_a_forked_child():
    run = _kernels(torch.Generator().manual_seed(1))
    want = run()
    errors = []

    def worker():
        try:
            for _ in range(5):
                for a, b in zip(want, run()):
                    assert torch.equal(a, b)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    pid = os.fork()
    if pid == 0:  # the child has none of the parent's pool threads: its regions must still finish
        signal.alarm(60)  # a hang fails the test instead of blocking the run
        # compared in numpy: torch's own OpenMP regions hang in a forked child (libgomp), ours not
        ok = all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(want, run()))
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
