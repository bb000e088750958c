"""Tile helpers shared by the log-prob kernels (inlined into each kernel by Triton).

A logits tile is z[t, v] = (h[t] . W[v] + b[v]) / T for BLOCK_N rows t and BLOCK_V vocab
entries v, computed by tl.dot over H in BLOCK_K chunks with an fp32 accumulator. It lives only
in registers; no kernel ever writes logits to memory.
"""
import triton
import triton.language as tl


@triton.jit
def logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, inv_temp,
                HAS_BIAS: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """z = (h[rows] @ W[cols].T + b[cols]) * inv_temp  -> [BLOCK_N, BLOCK_V] fp32.

    Out-of-range rows / cols / k are loaded as 0, so their logits are finite (= bias) and the
    caller masks them. UPCAST_DOT feeds fp32 operands to tl.dot (the interpreter's bf16/fp16
    dot is wrong); on a GPU it is off and bf16/fp16 tiles go to the tensor cores as they are.
    """
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * H  # [BN, 1] row starts (int64: V*H may be large)
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * H  # [BV, 1]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < H
        hb = tl.load(h_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                     other=0.0)  # [BN, BK]
        wb = tl.load(w_rows + ks[None, :], mask=col_mask[:, None] & k_mask[None, :],
                     other=0.0)  # [BV, BK]
        if UPCAST_DOT:
            hb = hb.to(tl.float32)
            wb = wb.to(tl.float32)
        acc = tl.dot(hb, tl.trans(wb), acc, input_precision=DOT_PRECISION)  # [BN, BV]
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)  # [BV]
        acc += b[None, :]
    return acc * inv_temp


@triton.jit
def dlogits_tile(z, cols, y, lse, coef, row_mask, col_mask):
    """dz[t, v] = coef[t] * (1[v == y_t] - exp(z[t, v] - lse[t]))  -> [BLOCK_N, BLOCK_V] fp32.

    coef = grad_logp / T. Masked rows/cols give exactly 0 (`where`, never `0 * inf`): padded
    rows may hold an overflowing exp because their lse was loaded as 0.
    """
    p = tl.exp(z - lse[:, None])
    p = tl.where(row_mask[:, None] & col_mask[None, :], p, 0.0)
    onehot = (cols[None, :] == y[:, None]).to(tl.float32)
    return coef[:, None] * (onehot - p)
