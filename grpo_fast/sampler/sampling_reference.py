"""Plain-PyTorch reference of the token sampling op (grpo_fast.sampler.sampling_op.sample):
obviously correct, slow; the oracle of the C++ and CUDA samplers, with the same contract.
"""
from __future__ import annotations

import numpy as np
import torch

from grpo_fast.intmath import uniform01


def uniform(seeds, steps) -> np.ndarray:
    """Counter-based uniforms in [0, 1), float64, one per (seed, step) (grpo_fast.intmath.uniform01).
    Keyed by (seed, step) only, so a sequence's draws do not depend on the batch it is in."""
    return np.array([uniform01(int(s), int(t)) for s, t in zip(seeds, steps)], dtype=np.float64)


def keep_mask(probs: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Which tokens survive the filters, for one row of probabilities p [V] (float64).

    top-k: keep p >= (k-th largest p)                     (ties at the boundary kept)
    top-p: over the top-k survivors, renormalized, keep p >= p_(m) where m is the smallest count
           whose sorted cumulative mass reaches top_p      (ties kept)
    min-p: keep p >= min_p * max(p)
    """
    keep = torch.ones_like(probs, dtype=torch.bool)
    v = probs.numel()
    if 0 < top_k < v:
        kth = torch.topk(probs, top_k).values[-1]
        keep &= probs >= kth
    if top_p < 1.0:
        kept = torch.where(keep, probs, torch.zeros_like(probs))
        srt = torch.sort(kept, descending=True).values
        csum = torch.cumsum(srt, 0)
        m = int(torch.searchsorted(csum, top_p * csum[-1]).clamp(max=v - 1))
        keep &= probs >= srt[m]
    if min_p > 0.0:
        keep &= probs >= min_p * probs.max()
    return keep


def sample(logits, temperature, top_k, top_p, min_p, seeds, steps):
    """Reference sampler; returns (token_ids [S] int64, logprobs [S] fp32).

    Row s: temperature 0 -> greedy argmax (first maximum) with logprob under softmax(logits).
    Otherwise p = softmax(logits / T) (computed in float64), the filters of `keep_mask`, then
    inverse-CDF sampling over the kept tokens in vocabulary order with u = uniform(seed, step):
    the token is the first kept index whose running kept mass exceeds u * (total kept mass).
    The returned logprob is log p[token] under the temperature-scaled FULL distribution
    softmax(logits / T) (no filtering): the distribution the trainer scores.
    """
    S, V = logits.shape
    us = uniform(seeds.tolist(), steps.tolist())
    tokens = torch.empty(S, dtype=torch.int64)
    logprobs = torch.empty(S, dtype=torch.float32)
    for s in range(S):
        row = logits[s].double().cpu()
        t = float(temperature[s])
        if t == 0.0:
            tok = int(torch.argmax(row))
            lp = row[tok] - torch.logsumexp(row, 0)
        else:
            z = row / t
            logp = z - torch.logsumexp(z, 0)
            e = torch.exp(z - z.max())
            p = e * (1.0 / e.sum())  # the same rounding as the native sampler's probabilities
            keep = keep_mask(p, int(top_k[s]), float(top_p[s]), float(min_p[s]))
            kp = torch.where(keep, p, torch.zeros_like(p))
            csum = torch.cumsum(kp, 0)
            target = us[s] * float(csum[-1])
            idx = int(torch.searchsorted(csum, torch.tensor(target, dtype=torch.float64),
                                         right=True))
            kept_idx = torch.nonzero(keep).flatten()
            tok = min(idx, int(kept_idx[-1]))
            if not keep[tok]:  # searchsorted landed on a zero-mass token: take the next kept one
                tok = int(kept_idx[kept_idx >= tok][0])
            lp = logp[tok]
        tokens[s] = tok
        logprobs[s] = float(lp)
    return tokens.to(logits.device), logprobs.to(logits.device)
