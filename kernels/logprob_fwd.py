"""Forward log-prob kernel: online logsumexp over vocab tiles, target logit, entropy.

Grid = (row blocks, V splits). Program (i, s) owns rows [i*BLOCK_N, (i+1)*BLOCK_N) and the
vocab range [s*v_per_split, (s+1)*v_per_split) (a whole number of BLOCK_V tiles, never empty).
It sweeps its tiles once, keeping per row, like flash-attention's softmax:

    m  = running max of z                 s = sum_v exp(z_v - m)
    a  = sum_v exp(z_v - m) * (z_v - m)   zy = z[y] if y falls in this range, else 0

and writes (m, s, zy, a) to part[4, S, N]. Splitting V keeps the GPU full when N is small
(one row block per 64 tokens would leave most SMs idle for a few hundred tokens); the host
combines the S partials (`combine_partials`), which is O(S*N) work next to O(N*V*H).

The logits are z = transform(h @ W.T + b) (_logprob_tiles: a scale, or a tanh soft cap).
INPUT_GRAD (frozen head: only hidden needs a gradient; never with a soft cap) also accumulates, in the same sweep,
E[s, t, :] = sum_v exp(z_tv - m_t) W[v] into a global fp32 buffer [S, N, H] the program owns,
rescaled by alpha whenever m grows. The host then forms d logp_t / d h_t = (W[y_t] - E_t / s_t) / T,
so a frozen-head step costs two matmuls of N*V*H (logits, e @ W) in one sweep and its backward
is an elementwise product, instead of three (forward, recomputed logits, dz @ W).

`a` is kept relative to the running max, so entropy = log s - a/s has no cancellation between
lse and E[z] (which are both ~|z| large at low temperature). On a new max m' the old terms
shift: a' = alpha * (a + s * (m - m')) with alpha = exp(m - m'); m starts at -1e30 (finite),
so the first tile gives alpha = 0 and s * (m - m') = 0 * finite = 0, never 0 * inf.
"""
import triton
import triton.language as tl

from ._logprob_tiles import accumulate_product, logits_tile


@triton.jit
def logprob_fwd_kernel(h_ptr, w_ptr, b_ptr, y_ptr, part_ptr, e_ptr, N, V, H, v_per_split,
                       pre, post,
                       HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                       COMPUTE_ENTROPY: tl.constexpr, INPUT_GRAD: tl.constexpr,
                       UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_mask = rows < N
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)  # [BN] int64

    m = tl.full((BLOCK_N,), -1.0e30, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)
    zy = tl.zeros((BLOCK_N,), tl.float32)
    if INPUT_GRAD:
        e_rows = e_ptr + split.to(tl.int64) * N * H + rows.to(tl.int64)[:, None] * H  # [BN, 1]
    v_begin = split * v_per_split
    v_end = tl.minimum(v_begin + v_per_split, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)  # [BV]
        col_mask = cols < V  # a tile never crosses a split boundary, only the end of V
        z = logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, pre, post,
                        HAS_BIAS, HAS_SOFTCAP, UPCAST_DOT, DOT_PRECISION,
                        BLOCK_N, BLOCK_V, BLOCK_K)  # [BN, BV]
        z = tl.where(col_mask[None, :], z, -1.0e30)  # finite, so e * (z - m) is 0, not 0 * inf
        m_new = tl.maximum(m, tl.max(z, axis=1))  # a real logit: every tile has a valid column
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])  # [BN, BV], 0 on masked cols
        if COMPUTE_ENTROPY:
            a = alpha * (a + s * (m - m_new)) + tl.sum(e * (z - m_new[:, None]), axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        m = m_new
        if INPUT_GRAD:
            # E[split, rows, :] = alpha * E + e @ W[cols]: flash-attention's P @ V with K = V = W,
            # rescaled during the read-modify-write that the [BN, H] accumulator needs anyway.
            ec = e
            if not UPCAST_DOT:
                ec = e.to(w_ptr.dtype.element_ty)  # e in [0, 1]: bf16 operand, fp32 accumulate
            accumulate_product(e_rows, row_mask, ec, w_ptr + cols.to(tl.int64)[:, None] * H, col_mask, H,
                               alpha, True, UPCAST_DOT, DOT_PRECISION, BLOCK_K)

    out = part_ptr + split * N + rows  # part[k, split, row]
    plane = n_splits * N
    tl.store(out, m, mask=row_mask)
    tl.store(out + plane, s, mask=row_mask)
    tl.store(out + 2 * plane, zy, mask=row_mask)
    if COMPUTE_ENTROPY:
        tl.store(out + 3 * plane, a, mask=row_mask)
