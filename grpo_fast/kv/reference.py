"""Plain-PyTorch reference implementations of the KV-cache ops: obviously correct, slow.

They are the test oracle for the C++ CPU and CUDA kernels (`grpo_fast.kv.ops`) and share their
contracts exactly. Cache layout per layer: key_cache, value_cache [num_blocks, block_size, Hkv, D];
token slot s lives at block s // block_size, offset s % block_size.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def append_kv(key_cache, value_cache, key, value, slot_mapping) -> None:
    """key_cache.view(-1, Hkv, D)[slot_mapping[t]] = key[t] for every t with slot >= 0 (in place)."""
    nb, bs, h, d = key_cache.shape
    keep = slot_mapping >= 0  # [T]
    slots = slot_mapping[keep].long()
    key_cache.view(nb * bs, h, d)[slots] = key[keep].to(key_cache.dtype)
    value_cache.view(nb * bs, h, d)[slots] = value[keep].to(value_cache.dtype)


def copy_blocks(key_cache, value_cache, block_mapping) -> None:
    """cache[dst] = cache[src] for every (src, dst) row of block_mapping [M, 2] (in place)."""
    src = block_mapping[:, 0].long()
    dst = block_mapping[:, 1].long()
    key_cache[dst] = key_cache[src]
    value_cache[dst] = value_cache[src]


def gather_kv(key_cache, value_cache, block_table, n: int):
    """The first n tokens' K, V of one sequence, contiguous: ([n, Hkv, D], [n, Hkv, D])."""
    bs = key_cache.shape[1]
    pos = torch.arange(n, device=key_cache.device)
    blocks = block_table[(pos // bs)].long()
    return key_cache[blocks, pos % bs], value_cache[blocks, pos % bs]


def _sdpa(q, k, v, scale, causal: bool):
    """softmax(q k^T * scale) v in fp32; q [Tq, Hq, D], k/v [Tk, Hkv, D]; GQA by repeat.

    Causal masking is bottom-right aligned: query i sees keys j <= Tk - Tq + i.
    """
    hq, hkv = q.shape[1], k.shape[1]
    rep = hq // hkv
    q32 = q.float().transpose(0, 1)  # [Hq, Tq, D]
    k32 = k.float().repeat_interleave(rep, dim=1).transpose(0, 1)  # [Hq, Tk, D]
    v32 = v.float().repeat_interleave(rep, dim=1).transpose(0, 1)
    mask = None
    if causal:
        tq, tk = q.shape[0], k.shape[0]
        i = torch.arange(tq, device=q.device)[:, None]
        j = torch.arange(tk, device=q.device)[None, :]
        mask = j <= (tk - tq + i)  # [Tq, Tk]
    out = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)  # [Tq, Hq, D]


def paged_decode_attention(query, key_cache, value_cache, block_tables, context_lens, scale):
    """out[s] = softmax(q_s K_s^T * scale) V_s over the first context_lens[s] tokens of sequence s,
    K_s / V_s gathered through block_tables[s]; query head h reads kv head h // (Hq / Hkv).
    query [S, Hq, D] -> out [S, Hq, D] in query's dtype; accumulation in fp32."""
    out = torch.empty_like(query)
    for s in range(query.shape[0]):
        n = int(context_lens[s])
        if n == 0:
            out[s] = 0
            continue
        k, v = gather_kv(key_cache, value_cache, block_tables[s], n)
        out[s] = _sdpa(query[s:s + 1], k, v, scale, causal=False)[0].to(query.dtype)
    return out


def prefill_attention(query, key, value, cu_seqlens, scale, cu_seqlens_k=None):
    """Causal attention over packed variable-length sequences.

    query [T, Hq, D], key/value [Tk, Hkv, D]; sequence b owns query rows cu_seqlens[b]:cu_seqlens[b+1]
    and key rows cu_seqlens_k[b]:cu_seqlens_k[b+1] (default: the same as the queries). With more
    keys than queries (a cached prefix gathered in front), the mask is bottom-right aligned.
    """
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    out = torch.empty_like(query)
    for b in range(cu_seqlens.numel() - 1):
        q0, q1 = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
        k0, k1 = int(cu_k[b]), int(cu_k[b + 1])
        if q1 > q0:
            out[q0:q1] = _sdpa(query[q0:q1], key[k0:k1], value[k0:k1], scale, True).to(query.dtype)
    return out


# ---- sampling ---------------------------------------------------------------------------------

def _mix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def uniform(seeds, steps) -> np.ndarray:
    """Counter-based uniforms in [0, 1): u = top 53 bits of mix64(mix64(seed) ^ step) / 2^53.

    Keyed by (seed, step) only, so a sequence's draws do not depend on the batch it is in.
    """
    s = np.asarray(seeds, dtype=np.int64).astype(np.uint64)
    t = np.asarray(steps, dtype=np.int64).astype(np.uint64)
    h = _mix64(_mix64(s) ^ t)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


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
    us = uniform(seeds.cpu().numpy(), steps.cpu().numpy())
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
