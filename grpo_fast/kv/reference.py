"""Plain-PyTorch reference implementations of the KV-cache ops: obviously correct, slow.

They are the test oracle for the C++ CPU and CUDA kernels (`grpo_fast.kv.ops`) and share their
contracts exactly. Cache layout per layer: key_cache, value_cache [num_blocks, block_size, Hkv, D];
token slot s lives at block s // block_size, offset s % block_size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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


def cascade_decode_attention(query, key_cache, value_cache, block_tables, context_lens, scale, group_rows,
                             group_starts, prefix_lens):
    """The same as paged_decode_attention (the grouping only says which keys may be read once
    for several sequences), with each group's prefix part and own part computed apart and merged
    through their log-sum-exp, as the kernels do: for query q and key ranges A (shared prefix)
    and B (own keys), with m_X = max_j s_j, l_X = sum_j exp(s_j - m_X), o_X = sum_j exp(s_j - m_X) v_j,
    out = (o_A e^(m_A - M) + o_B e^(m_B - M)) / (l_A e^(m_A - M) + l_B e^(m_B - M)), M = max(m_A, m_B)."""
    out = torch.empty_like(query)
    hq, hkv = query.shape[1], key_cache.shape[2]
    prefix_of = {}
    for g in range(prefix_lens.numel()):
        for i in range(int(group_starts[g]), int(group_starts[g + 1])):
            prefix_of[int(group_rows[i])] = int(prefix_lens[g])
    for s in range(query.shape[0]):
        n, p = int(context_lens[s]), prefix_of[s]
        k, v = gather_kv(key_cache, value_cache, block_tables[s], n)  # [n, Hkv, D]
        k = k.float().repeat_interleave(hq // hkv, dim=1)  # [n, Hq, D]
        v = v.float().repeat_interleave(hq // hkv, dim=1)
        scores = torch.einsum("hd,nhd->hn", query[s].float(), k) * scale  # [Hq, n]
        num = torch.zeros(hq, query.shape[2], device=query.device)
        den = torch.zeros(hq, device=query.device)
        parts = [(0, p), (p, n)]
        ms = [scores[:, a:b].amax(1) if b > a else torch.full((hq,), -torch.inf, device=query.device)
              for a, b in parts]
        top = torch.maximum(*ms)
        for (a, b), m in zip(parts, ms):
            if b > a:
                w = torch.exp(scores[:, a:b] - m[:, None])  # [Hq, b - a]
                scale_x = torch.exp(m - top)[:, None]
                num += torch.einsum("hn,nhd->hd", w, v[a:b]) * scale_x
                den += w.sum(1) * scale_x[:, 0]
        out[s] = torch.where(den[:, None] > 0, num / den.clamp_min(1e-30)[:, None], 0.0).to(query.dtype)
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
