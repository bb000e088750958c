"""The native module: imports with no GPU driver, carries the CUDA kernels when nvcc was found,
links the CUDA runtime statically, and shares its hash / RNG definitions with Python."""
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from fresh_process import run_fresh
from grpo_fast import _C
from grpo_fast.sampler import sampling_reference as ref
from grpo_fast.kv._hash import ROOT_HASH, block_hash

CUDA_OPS = ["cuda_append_kv", "cuda_copy_blocks", "cuda_paged_decode_attention",
            "cuda_prefill_attention", "cuda_sample"]


def test_cuda_kernels_compiled_in_when_nvcc_is_present():
    wanted = shutil.which("nvcc") is not None and os.environ.get("GRPO_FAST_CUDA", "AUTO") != "OFF"
    if not wanted and not _C.built_with_cuda():
        pytest.skip("reason: no nvcc on this machine, so the CPU-only build is expected")
    assert _C.built_with_cuda()
    for name in CUDA_OPS:
        assert hasattr(_C, name), name


def test_module_links_no_cuda_shared_library():
    out = subprocess.run(["ldd", _C.__file__], capture_output=True, text=True).stdout
    assert "libcudart" not in out and "libcuda.so" not in out, out


def test_import_and_cpu_ops_work_without_a_gpu():
    code = ("import torch, grpo_fast.kv as kv; "
            "bm = kv.BlockManager(4, 2); bm.allocate(0, [1, 2, 3]); "
            "print(bm.block_table(0), torch.cuda.is_available())")
    assert run_fresh(code, env={"CUDA_VISIBLE_DEVICES": ""}) == "[0, 1] False"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-driver error path")
def test_cuda_launch_without_driver_raises_instead_of_crashing():
    if not _C.built_with_cuda():
        pytest.skip("reason: CPU-only build")
    code = ("import grpo_fast._C as C\n"
            "try:\n"
            "    C.cuda_copy_blocks(0, 0, 0, 1, 1, 16, 0, 0)\n"
            "except RuntimeError as e:\n"
            "    print('raised', e)\n")
    assert run_fresh(code).startswith("raised")


def test_block_hash_and_rng_agree_with_python():
    for parent, toks in [(ROOT_HASH, [1, 2, 3]), (5, [-1, 2**40, 0]), (0, [])]:
        assert _C.block_hash(parent, toks) == block_hash(parent, toks)
    # RNG: a 2-token uniform row picks token 1 iff u >= 0.5 (see test_sampling_kernel for more)
    seeds, steps = np.array([7, -3, 2**62]), np.array([0, 5, 9])
    u = ref.uniform(seeds, steps)
    tok, _ = _C_sample_two_tokens(seeds, steps)
    assert tok.tolist() == (u >= 0.5).astype(int).tolist()


def _C_sample_two_tokens(seeds, steps):
    from grpo_fast.sampler import sample
    S = len(seeds)
    return sample(torch.zeros(S, 2), torch.ones(S), torch.zeros(S, dtype=torch.int32),
                     torch.ones(S), torch.zeros(S), torch.tensor(seeds), torch.tensor(steps))
