"""grpo_fast.torch_threads: torch's thread count set without switching MKL's dynamic mode off.

Each test that changes torch's thread count or MKL's mode runs in a fresh process: both are
process-wide and would leak into the other tests."""

import pytest
import torch

from fresh_process import run_fresh
from grpo_fast import torch_threads


needs_mkl = pytest.mark.skipif(torch_threads.mkl_dynamic() is None,
                               reason="this torch build carries no MKL (nothing for set_torch_threads to keep on)")


@needs_mkl
def test_plain_set_num_threads_switches_mkl_dynamic_off_and_ours_keeps_it():
    """The fact the module exists for (torch switches MKL's dynamic mode off), and the fix."""
    got = run_fresh("""
        import torch
        from grpo_fast.torch_threads import mkl_dynamic, set_torch_threads
        start = mkl_dynamic()
        torch.set_num_threads(torch.get_num_threads())
        after_torch = mkl_dynamic()
        set_torch_threads(1)
        print(start, after_torch, mkl_dynamic(), torch.get_num_threads())
    """)
    assert got == "True False True 1"


@needs_mkl
def test_the_thread_governor_leaves_mkl_dynamic_on():
    """A micro-batch run on 1 thread and torch's count restored after it, as the trainer runs
    each one (before the fix: torch.set_num_threads twice, MKL's mode off from then on)."""
    got = run_fresh("""
        import torch
        from grpo_fast.torch_threads import mkl_dynamic
        from grpo_fast.thread_governor import ThreadGovernor
        before = torch.get_num_threads()
        gov = ThreadGovernor(max_threads=max(2, before))
        assert gov.enabled
        gov.choice = 1
        with gov.measure():
            inside = torch.get_num_threads()
        print(inside, torch.get_num_threads() == before, mkl_dynamic())
    """)
    assert got == "1 True True"


@needs_mkl
def test_mkl_dynamic_false_in_the_environment_is_respected():
    got = run_fresh("""
        import os
        os.environ["MKL_DYNAMIC"] = "FALSE"
        import torch
        from grpo_fast.torch_threads import mkl_dynamic, set_torch_threads
        set_torch_threads(1)
        print(mkl_dynamic())
    """)
    assert got == "False"


def test_no_torch_call_when_the_count_is_unchanged(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    torch_threads.set_torch_threads(torch.get_num_threads())
    assert calls == []
    torch_threads.set_torch_threads(torch.get_num_threads() + 1)
    assert calls == [torch.get_num_threads() + 1]
