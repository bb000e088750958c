"""The token sampling op: one token per row of logits, with the logged log-prob, registered as
``torch.ops.grpo_fast.sample``.

Runs the C++ sampler on CPU tensors (csrc/sampling_cpu.cpp) and the CUDA one on CUDA tensors
(csrc/cuda/sampling_cuda.cu); without a native build, the plain-PyTorch reference
(grpo_fast.sampler.sampling_reference) with the same contract.
"""
from __future__ import annotations

import torch

from grpo_fast import checks
from grpo_fast.native import Backend, native_for

from . import sampling_reference as ref

__all__ = ["sample"]

_F32, _I32, _I64 = (torch.float32,), (torch.int32,), (torch.int64,)


def _launch(backend: Backend, logits, temperature, top_k, top_p, min_p, seeds, steps):
    S, V = logits.shape
    tokens = torch.empty(S, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(S, dtype=torch.float32, device=logits.device)
    # CUDA: per-row fp32 probabilities, reused by the filter passes; the CPU kernel needs none.
    workspace = (torch.empty_like(logits).data_ptr(),) if backend.cuda else ()
    backend.sample(tokens.data_ptr(), logprobs.data_ptr(), logits.data_ptr(), temperature.data_ptr(),
                   top_k.data_ptr(), top_p.data_ptr(), min_p.data_ptr(), seeds.data_ptr(), steps.data_ptr(),
                   S, V, *workspace, *backend.stream_args(logits))
    return tokens, logprobs


@torch.library.custom_op("grpo_fast::sample", mutates_args=())
def _sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
            top_p: torch.Tensor, min_p: torch.Tensor, seeds: torch.Tensor,
            steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = native_for(logits, "sample")
    if n is None:
        return ref.sample(logits, temperature, top_k, top_p, min_p, seeds, steps)
    return _launch(n, logits, temperature, top_k, top_p, min_p, seeds, steps)


@_sample.register_fake
def _(logits, temperature, top_k, top_p, min_p, seeds, steps):
    S = logits.shape[0]
    return (logits.new_empty(S, dtype=torch.int64), logits.new_empty(S, dtype=torch.float32))


def sample(logits, temperature, top_k, top_p, min_p, seeds, steps):
    """Sample one token per row; returns (token_ids [S] int64, logprobs [S] fp32).

    logits [S, V] fp32; per-row temperature [S] fp32 (0 = greedy), top_k [S] int32 (0 = off),
    top_p [S] fp32 in (0, 1] (1 = off), min_p [S] fp32 in [0, 1] (0 = off), seeds [S] int64,
    steps [S] int64. Filters apply in the order top-k, top-p (over the renormalized top-k
    survivors), min-p (relative to the max probability); ties at a boundary are kept. The draw
    is inverse-CDF in vocabulary order over the survivors with u = uniform(seed, step), a
    counter-based hash, so a sequence's tokens depend only on its own (seed, step), not on the
    batch.

    Logprob semantics: log softmax(logits / T)[token] over the FULL vocabulary, i.e. the
    temperature-scaled distribution BEFORE top-k/top-p/min-p filtering: what the trainer
    computes from the same logits. Greedy rows (T = 0) report log softmax(logits)[token] (T = 1).
    """
    checks.tensor("logits", logits, ndim=2, dtypes=_F32)
    S, dev = logits.shape[0], logits.device
    if logits.shape[1] == 0:
        raise ValueError("logits must have a non-empty vocabulary dim")
    for name, t, dtypes in (("temperature", temperature, _F32), ("top_k", top_k, _I32), ("top_p", top_p, _F32),
                            ("min_p", min_p, _F32), ("seeds", seeds, _I64), ("steps", steps, _I64)):
        checks.tensor(name, t, dtypes=dtypes, device=dev, shape=(S,))
    if not torch.compiler.is_compiling() and dev.type == "cpu" and S > 0:
        if bool((temperature < 0).any()) or not bool(torch.isfinite(temperature).all()):
            raise ValueError("temperature must be finite and >= 0")
        if bool((top_k < 0).any()):
            raise ValueError("top_k must be >= 0 (0 = off)")
        if bool(((top_p <= 0) | (top_p > 1)).any()):
            raise ValueError("top_p must lie in (0, 1] (1 = off)")
        if bool(((min_p < 0) | (min_p > 1)).any()):
            raise ValueError("min_p must lie in [0, 1] (0 = off)")
    return _sample(logits, temperature, top_k, top_p, min_p, seeds, steps)
