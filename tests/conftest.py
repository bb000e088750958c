"""Test set-up: run Triton kernels in the interpreter when there is no GPU.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so this runs
before the test modules import grpo_fast.kernels.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
