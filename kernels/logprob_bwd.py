"""Backward log-prob kernels: recompute logits tiles, form dz, accumulate dh and dW / db.

    dz[t, v] = g[t] * (1[v == y_t] - softmax(z_t)_v) / T        (g = grad_logp, lse from forward)
    grad_hidden = dz @ W     grad_weight = dz^T @ h     grad_bias = sum_t dz[t]

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

Row blocks whose g is all zero (masked tokens, zero-advantage groups) are skipped: their dz is
0, and the buffers start at zero.
"""
import triton
import triton.language as tl

from ._logprob_tiles import dlogits_tile, logits_tile


@triton.jit
def logprob_bwd_dh_kernel(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, dh_ptr, N, V, H,
                          v_per_split, inv_temp,
                          HAS_BIAS: tl.constexpr, UPCAST_DOT: tl.constexpr,
                          DOT_PRECISION: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_mask = rows < N
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)  # [BN] fp32
    if tl.max(tl.abs(g), axis=0) > 0:
        y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        coef = g * inv_temp
        dh_rows = dh_ptr + split.to(tl.int64) * N * H + rows.to(tl.int64)[:, None] * H  # [BN, 1]
        v_begin = split * v_per_split
        v_end = tl.minimum(v_begin + v_per_split, V)
        for v0 in range(v_begin, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)  # [BV]
            col_mask = cols < V
            z = logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, inv_temp,
                            HAS_BIAS, UPCAST_DOT, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
            dz = dlogits_tile(z, cols, y, lse, coef, row_mask, col_mask)  # [BN, BV] fp32
            if not UPCAST_DOT:
                dz = dz.to(w_ptr.dtype.element_ty)  # bf16/fp16 operand for the tensor cores
            w_rows = w_ptr + cols.to(tl.int64)[:, None] * H  # [BV, 1]
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_mask = ks < H
                wb = tl.load(w_rows + ks[None, :], mask=col_mask[:, None] & k_mask[None, :],
                             other=0.0)  # [BV, BK]
                if UPCAST_DOT:
                    wb = wb.to(tl.float32)
                out_mask = row_mask[:, None] & k_mask[None, :]
                acc = tl.load(dh_rows + ks[None, :], mask=out_mask, other=0.0)  # [BN, BK] fp32
                acc = tl.dot(dz, wb, acc, input_precision=DOT_PRECISION)
                tl.store(dh_rows + ks[None, :], acc, mask=out_mask)


@triton.jit
def logprob_bwd_dw_kernel(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, dw_ptr, db_ptr, N, V, H,
                          inv_temp,
                          HAS_BIAS: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
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
        g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
        if tl.max(tl.abs(g), axis=0) > 0:
            y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
            lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
            z = logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, inv_temp,
                            HAS_BIAS, UPCAST_DOT, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
            dz = dlogits_tile(z, cols, y, lse, g * inv_temp, row_mask, col_mask)  # [BN, BV]
            if NEED_DB:
                db += tl.sum(dz, axis=0)
            if NEED_DW:
                dzt = tl.trans(dz)  # [BV, BN]
                if not UPCAST_DOT:
                    dzt = dzt.to(h_ptr.dtype.element_ty)
                h_rows = h_ptr + rows.to(tl.int64)[:, None] * H  # [BN, 1]
                for k0 in range(0, H, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    k_mask = ks < H
                    hb = tl.load(h_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                                 other=0.0)  # [BN, BK]
                    if UPCAST_DOT:
                        hb = hb.to(tl.float32)
                    out_mask = col_mask[:, None] & k_mask[None, :]
                    acc = tl.load(dw_rows + ks[None, :], mask=out_mask, other=0.0)  # [BV, BK]
                    acc = tl.dot(dzt, hb, acc, input_precision=DOT_PRECISION)
                    tl.store(dw_rows + ks[None, :], acc, mask=out_mask)
    if NEED_DB:
        tl.store(db_ptr + cols, db, mask=col_mask)
