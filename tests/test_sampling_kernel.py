"""Sampler: exact agreement with the reference, logprob semantics, per-sequence reproducibility,
and empirical frequencies vs the filtered distribution (top-k / top-p / min-p).

The statistical tests draw N tokens from one row with N different steps (counter-based RNG) and
compare the counts with N * q (q = the renormalized surviving distribution) by Pearson's
chi-square. The seed is fixed, so a test cannot flake; the bound (chi2 < 3 * df + 30, far past
the 1e-6 tail for df <= 10) only has to reject a wrong distribution, which gives chi2 in the
thousands at this N.
"""
import math

import numpy as np
import pytest
import torch

from grpo_fast.sampler import sample
from grpo_fast.sampler import sampling_reference as ref

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def params(S, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, device="cpu"):
    return dict(
        temperature=torch.full((S,), temperature, dtype=torch.float32, device=device),
        top_k=torch.full((S,), top_k, dtype=torch.int32, device=device),
        top_p=torch.full((S,), top_p, dtype=torch.float32, device=device),
        min_p=torch.full((S,), min_p, dtype=torch.float32, device=device),
        seeds=torch.full((S,), seed, dtype=torch.int64, device=device),
        steps=torch.arange(S, dtype=torch.int64, device=device),
    )


def call(fn, logits, p):
    return fn(logits, p["temperature"], p["top_k"], p["top_p"], p["min_p"], p["seeds"], p["steps"])


def test_counter_rng_is_uniform_and_matches_native():
    u = ref.uniform(np.full(200_000, 3), np.arange(200_000))
    assert u.min() >= 0 and u.max() < 1
    hist = np.histogram(u, bins=20, range=(0, 1))[0]
    chi2 = ((hist - 10_000) ** 2 / 10_000).sum()
    assert chi2 < 3 * 19 + 30
    # the native sampler uses the same u: a 2-token row with p = (0.5, 0.5) picks 1 iff u >= 0.5
    S = 64
    logits = torch.zeros(S, 2)
    tok, _ = call(sample, logits, params(S, seed=3))
    assert tok.tolist() == (ref.uniform(np.full(S, 3), np.arange(S)) >= 0.5).astype(int).tolist()


@pytest.mark.parametrize("cfg", [
    dict(), dict(temperature=0.7, top_k=5), dict(top_p=0.8), dict(min_p=0.1),
    dict(temperature=1.3, top_k=40, top_p=0.9, min_p=0.02), dict(temperature=0.0),
    dict(top_k=1), dict(top_p=1e-6),
])
def test_native_matches_reference_exactly(cfg):
    gen = torch.Generator().manual_seed(0)
    S, V = 16, 1031
    logits = torch.randn(S, V, generator=gen) * 4
    p = params(S, seed=11, **cfg)
    tok, lp = call(sample, logits, p)
    tok_r, lp_r = call(ref.sample, logits, p)
    assert tok.dtype == torch.int64 and lp.dtype == torch.float32
    assert tok.tolist() == tok_r.tolist()
    torch.testing.assert_close(lp, lp_r, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_logprob_is_full_temperature_scaled_distribution(device):
    gen = torch.Generator().manual_seed(1)
    S, V = 32, 500
    logits = (torch.randn(S, V, generator=gen) * 3).to(device)
    p = params(S, temperature=0.6, top_k=10, top_p=0.7, seed=5, device=device)
    tok, lp = call(sample, logits, p)
    full = torch.log_softmax(logits.double() / 0.6, dim=-1)  # NOT renormalized over the survivors
    torch.testing.assert_close(lp.double(), full.gather(1, tok[:, None])[:, 0], atol=1e-5, rtol=1e-5)
    g = params(S, temperature=0.0, device=device)
    tok, lp = call(sample, logits, g)
    assert torch.equal(tok, logits.argmax(-1))
    torch.testing.assert_close(lp.double(), torch.log_softmax(logits.double(), -1).gather(
        1, tok[:, None])[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_draws_depend_only_on_seed_and_step(device):
    gen = torch.Generator().manual_seed(2)
    S, V = 24, 300
    logits = torch.randn(S, V, generator=gen).to(device)
    p = params(S, top_p=0.95, device=device)
    p["seeds"] = torch.arange(100, 100 + S, device=device)
    p["steps"] = torch.arange(S, device=device) * 7
    tok, _ = call(sample, logits, p)
    perm = torch.randperm(S, generator=gen).to(device)
    sub = {k: v[perm[:9]].contiguous() for k, v in p.items()}
    tok_sub, _ = call(sample, logits[perm[:9]].contiguous(), sub)
    assert torch.equal(tok_sub, tok[perm[:9]])  # batch composition does not matter
    assert torch.equal(call(sample, logits, p)[0], tok)  # and repeats exactly
    p["steps"] = p["steps"] + 1
    assert not torch.equal(call(sample, logits, p)[0], tok)


def expected_distribution(probs, top_k=0, top_p=1.0, min_p=0.0):
    """The filtered, renormalized distribution, computed independently of the reference:
    sort once, apply each filter as a cut of the sorted list."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep = order[:top_k] if top_k else order
    mass = sum(probs[i] for i in keep)
    if top_p < 1.0:
        c, cut = 0.0, []
        for i in keep:
            cut.append(i)
            c += probs[i]
            if c >= top_p * mass - 1e-12:
                break
        keep = cut
    keep = [i for i in keep if probs[i] >= min_p * probs[order[0]]]
    z = sum(probs[i] for i in keep)
    return {i: probs[i] / z for i in keep}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", [
    dict(), dict(top_k=3), dict(top_p=0.75), dict(min_p=0.2), dict(top_k=5, top_p=0.9, min_p=0.05),
    dict(temperature=2.0, top_k=4),
])
def test_empirical_frequencies(device, cfg):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.7, 0.2, 0.0, -0.5, -1.0, -3.0, -6.0])
    N = 40_000
    temperature = cfg.pop("temperature", 1.0)
    probs = torch.softmax(logits.double() / temperature, 0).tolist()
    want = expected_distribution(probs, **cfg)
    p = params(N, temperature=temperature, seed=1234, device=device, **cfg)
    tok, _ = call(sample, logits.expand(N, -1).contiguous().to(device), p)
    counts = torch.bincount(tok.cpu(), minlength=len(probs)).tolist()
    for i, c in enumerate(counts):
        if i not in want:
            assert c == 0, f"filtered token {i} drawn {c} times"
    chi2 = sum((counts[i] - N * q) ** 2 / (N * q) for i, q in want.items())
    df = max(len(want) - 1, 1)
    assert chi2 < 3 * df + 30, (chi2, counts, want)


def test_validation_errors_name_the_argument():
    S = 3
    logits = torch.zeros(S, 10)
    base = params(S)
    cases = [
        ("logits", dict(logits=torch.zeros(S, 10, dtype=torch.float64))),
        ("logits", dict(logits=torch.zeros(10))),
        ("temperature", dict(temperature=torch.ones(S + 1))),
        ("temperature", dict(temperature=torch.full((S,), -1.0))),
        ("top_k", dict(top_k=torch.zeros(S, dtype=torch.int64))),
        ("top_k", dict(top_k=torch.full((S,), -2, dtype=torch.int32))),
        ("top_p", dict(top_p=torch.zeros(S))),
        ("min_p", dict(min_p=torch.full((S,), 1.5))),
        ("seeds", dict(seeds=torch.zeros(S, dtype=torch.int32))),
        ("steps", dict(steps=torch.zeros(S, 2, dtype=torch.int64))),
    ]
    for name, change in cases:
        args = {"logits": logits, **base, **change}
        with pytest.raises(ValueError, match=name):
            sample(**args)


def test_empty_batch():
    tok, lp = call(sample, torch.zeros(0, 7), params(0))
    assert tok.shape == (0,) and lp.shape == (0,)
    assert math.isfinite(float(call(sample, torch.zeros(1, 7), params(1))[1][0]))
