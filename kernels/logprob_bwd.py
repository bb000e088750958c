"""Backward log-prob kernels: recompute logits tiles, form dz, accumulate dh and dW / db.

    dz[t, v] = g[t] * (1[v == y_t] - p[t, v]) - g'[t] * p[t, v] * (log p[t, v] + entropy[t])
    dy = dz * dz/dy      (g = grad_logp, g' = grad_entropy when the entropy has a gradient,
                          p = softmax(z_t) from the forward's lse, dz/dy: _logprob_tiles)
    grad_hidden = dy @ W     grad_weight = dy^T @ h     grad_bias = sum_t dy[t]

Neither accumulator fits in registers (grad_hidden rows are H wide, H up to 4096+; grad_weight
rows too), so each kernel keeps its accumulator in a global fp32 buffer that exactly one
program owns, and updates it per tile with a plain load / tl.dot / store. No atomics: every
alternative split would add into the same outputs from ~V/BLOCK_V (or N/BLOCK_N) programs,
which is that many atomics per output element, contention, and run-to-run nondeterminism. The
owned-slice read-modify-write costs 8 bytes per accumulator element per tile (L2 resident when
BLOCK_N * H * 4 bytes per program times the resident programs fits L2; larger BLOCK_V/BLOCK_N
halve it) and keeps the result bit-reproducible.

* logprob_bwd_dh_kernel: grid (row blocks, V splits); program (i, s) adds the contribution of
  its vocab range to dh_part[s, rows, :]; the host sums the S partials (S = 1 for large N, so
  usually dh_part[0] is the answer) and casts to hidden's dtype.
* logprob_bwd_dw_kernel: grid (V tiles,); program j owns grad_weight[cols_j, :] and
  grad_bias[cols_j], sweeping all row blocks. It recomputes the logits tile a second time
  (the price of not using atomics) and is not launched at all for a frozen head.

Row blocks whose g (and g') is all zero (masked tokens, zero-advantage groups, tokens outside the
high-entropy mask) are skipped: their dz is 0, and the buffers start at zero. Both kernels'
accumulation is `accumulate_product` (_logprob_tiles).
"""
import triton
import triton.language as tl

from ._logprob_tiles import accumulate_product, dlogits_tile, logits_tile


@triton.jit
def _row_grads(g_ptr, gent_ptr, ent_ptr, rows, row_mask, ENTROPY_GRAD: tl.constexpr):
    """(g, g', entropy, any nonzero) for a row block; g' and entropy are 0 without ENTROPY_GRAD."""
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)  # [BN] fp32
    live = tl.max(tl.abs(g), axis=0)
    if ENTROPY_GRAD:
        g_ent = tl.load(gent_ptr + rows, mask=row_mask, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        live = tl.maximum(live, tl.max(tl.abs(g_ent), axis=0))
    else:
        g_ent = g
        ent = g
    return g, g_ent, ent, live > 0


@triton.jit
def logprob_bwd_dh_kernel(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, ent_ptr, gent_ptr, dh_ptr, N, V, H,
                          v_per_split, pre, post,
                          HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ENTROPY_GRAD: tl.constexpr,
                          UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_mask = rows < N
    g, g_ent, ent, live = _row_grads(g_ptr, gent_ptr, ent_ptr, rows, row_mask, ENTROPY_GRAD)
    if live:
        y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        dh_rows = dh_ptr + split.to(tl.int64) * N * H + rows.to(tl.int64)[:, None] * H  # [BN, 1]
        v_begin = split * v_per_split
        v_end = tl.minimum(v_begin + v_per_split, V)
        for v0 in range(v_begin, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)  # [BV]
            col_mask = cols < V
            z = logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, pre, post,
                            HAS_BIAS, HAS_SOFTCAP, UPCAST_DOT, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
            dz = dlogits_tile(z, cols, y, lse, g, ent, g_ent, row_mask, col_mask, pre, post,
                              ENTROPY_GRAD, HAS_SOFTCAP)  # [BN, BV] fp32
            if not UPCAST_DOT:
                dz = dz.to(w_ptr.dtype.element_ty)  # bf16/fp16 operand for the tensor cores
            accumulate_product(dh_rows, row_mask, dz, w_ptr + cols.to(tl.int64)[:, None] * H, col_mask, H,
                               1.0, False, UPCAST_DOT, DOT_PRECISION, BLOCK_K)


@triton.jit
def logprob_bwd_dw_kernel(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, ent_ptr, gent_ptr, dw_ptr, db_ptr, N, V, H,
                          pre, post,
                          HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ENTROPY_GRAD: tl.constexpr,
                          NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                          UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_v = tl.program_id(0)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # [BV]
    col_mask = cols < V
    dw_rows = dw_ptr + cols.to(tl.int64)[:, None] * H  # [BV, 1]
    db = tl.zeros((BLOCK_V,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)  # [BN]
        row_mask = rows < N
        g, g_ent, ent, live = _row_grads(g_ptr, gent_ptr, ent_ptr, rows, row_mask, ENTROPY_GRAD)
        if live:
            y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
            lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
            z = logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, pre, post,
                            HAS_BIAS, HAS_SOFTCAP, UPCAST_DOT, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
            dz = dlogits_tile(z, cols, y, lse, g, ent, g_ent, row_mask, col_mask, pre, post,
                              ENTROPY_GRAD, HAS_SOFTCAP)  # [BN, BV]
            if NEED_DB:
                db += tl.sum(dz, axis=0)
            if NEED_DW:
                dzt = tl.trans(dz)  # [BV, BN]
                if not UPCAST_DOT:
                    dzt = dzt.to(h_ptr.dtype.element_ty)
                accumulate_product(dw_rows, col_mask, dzt, h_ptr + rows.to(tl.int64)[:, None] * H, row_mask, H,
                                   1.0, False, UPCAST_DOT, DOT_PRECISION, BLOCK_K)
    if NEED_DB:
        tl.store(db_ptr + cols, db, mask=col_mask)
