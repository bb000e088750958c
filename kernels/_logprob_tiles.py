"""Tile helpers shared by the log-prob kernels (inlined into each kernel by Triton).

A logits tile is z[t, v] = transform(h[t] . W[v] + b[v]) for BLOCK_N rows t and BLOCK_V vocab
entries v, computed by tl.dot over H in BLOCK_K chunks with an fp32 accumulator. It lives only
in registers; no kernel ever writes logits to memory. The transform of raw logits y
(grpo_fast.loss.head) takes two scalars:

    no soft cap:  z = pre · y                    pre = s / T
    soft cap c:   z = post · tanh(pre · y)       pre = s / c, post = c / T

Every kernel's other [BN or BV, H] product (E += e @ W in the forward, dh += dz @ W, dW += dz^T @ h)
accumulates into an fp32 buffer in global memory that one program owns: `accumulate_product`.
"""
import triton
import triton.language as tl


@triton.jit
def logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, pre, post,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST_DOT: tl.constexpr,
                DOT_PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """z = transform(h[rows] @ W[cols].T + b[cols])  -> [BLOCK_N, BLOCK_V] fp32.

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
    if HAS_SOFTCAP:
        # tanh(x) = 2 sigmoid(2x) - 1: saturates cleanly for large |x| (no inf / inf)
        return post * (2.0 * tl.sigmoid(2.0 * pre * acc) - 1.0)
    return acc * pre


@triton.jit
def dlogits_tile(z, cols, y, lse, g, ent, g_ent, row_mask, col_mask, pre, post,
                 ENTROPY_GRAD: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """d(Σ_t g_t logp_t + g'_t entropy_t) / d y for a tile  -> [BLOCK_N, BLOCK_V] fp32:

        dz = g (1[v == y_t] - p) - g' p (log p + entropy_t),   p = exp(z - lse)
        dy = dz · dz/dy,   dz/dy = pre (no soft cap) or pre · post · (1 - (z / post)^2)

    Masked rows/cols give exactly 0 (`where`, never `0 * inf`): padded rows may hold an
    overflowing exp because their lse was loaded as 0.
    """
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    p = tl.where(row_mask[:, None] & col_mask[None, :], p, 0.0)
    onehot = (cols[None, :] == y[:, None]).to(tl.float32)
    dz = g[:, None] * (onehot - p)
    if ENTROPY_GRAD:
        dz -= g_ent[:, None] * p * (log_p + ent[:, None])
    if HAS_SOFTCAP:
        t = z * (1.0 / post)
        return dz * (pre * post * (1.0 - t * t))
    return dz * pre


@triton.jit
def accumulate_product(acc_rows, acc_mask, p, m_rows, m_mask, H, scale,
                       HAS_SCALE: tl.constexpr, UPCAST_DOT: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc[r, :] = scale[r] · acc[r, :] + Σ_j p[r, j] M[j, :] for the R rows at acc_rows ([R, 1]
    pointers into an fp32 [*, H] buffer this program owns) and the J rows of M at m_rows ([J, 1]
    pointers), over H in BLOCK_K chunks: one plain load / tl.dot / store per chunk.

    p is [R, J] fp32 under the interpreter, else already in M's dtype (bf16/fp16 operands for the
    tensor cores, fp32 accumulation). Rows outside acc_mask are neither read nor written; rows of
    M outside m_mask load as 0. `scale` ([R]) is read only with HAS_SCALE (the forward's rescale
    when the running max grows).
    """
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < H
        mb = tl.load(m_rows + ks[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [J, BK]
        if UPCAST_DOT:
            mb = mb.to(tl.float32)
        out_mask = acc_mask[:, None] & k_mask[None, :]
        acc = tl.load(acc_rows + ks[None, :], mask=out_mask, other=0.0)  # [R, BK] fp32
        if HAS_SCALE:
            acc = acc * scale[:, None]
        acc = tl.dot(p, mb, acc, input_precision=DOT_PRECISION)
        tl.store(acc_rows + ks[None, :], acc, mask=out_mask)
