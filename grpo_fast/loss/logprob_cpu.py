"""Chunked PyTorch backend of the selective log-prob op (the fast path for CPU tensors).

Same contract as the Triton backend `grpo_fast.kernels.logprob`. Per token t (one row of the
compacted hidden states) with target y_t, raw logits y = h @ W.T + b and z = LogitTransform(y):

    z_t = s · y_t / T   or, with a soft cap c,   z_t = c · tanh(s · y_t / c) / T      [V] fp32
    lse_t = logsumexp_v z_t,   logp_t = z_t[y_t] - lse_t
    entropy_t = lse_t - Σ_v softmax(z_t)_v z_t
    d logp_t / d z_t = onehot(y_t) - p_t,   d entropy_t / d z_t = -p_t (log p_t + entropy_t)
    d z / d y = s / T   (× (1 - tanh²) with a soft cap)

(matmuls in the input dtype, torch accumulates in fp32; fp32 from there on). Rows are processed
CHUNK_BYTES of fp32 logits (at most MAX_CHUNK_ROWS rows) at a time in buffers allocated once per
call (a fresh [C, V] tensor per chunk fragments the malloc heap: RSS then grows to several
chunks), so the extra memory is one or two [C, V] buffers instead of [N, V] tensors.

Besides the contract, `logprob_forward_input_grad` serves a frozen head (no grad to W or b, no
soft cap): since d logp_t / d h_t = (s/T) (W[y_t] - p_t @ W), the forward multiplies the
probabilities it already holds by W once more and the backward needs no matmul at all — two
matmuls of N·V·H in total instead of three (forward, recomputed logits, dz @ W). Measured in
benchmarks/RESULTS.md. With a `RowGrads` plan it also gives d entropy / d h (one more product,
for the hot rows only) and skips the rows that need no gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor

from grpo_fast import onednn_gemm
from grpo_fast.loss.rows import gather_rows

# fp32 logits per chunk buffer, and at most MAX_CHUNK_ROWS rows: the GEMMs of a chunk run at
# ~60 GFLOPS on 2 AVX2 cores from ~256 rows on, but at ~30-40 with 55 rows (what 32 MiB gave
# for V = 152k); 256 rows of V = 152k are 155 MB, far under the naive path's [N, V] tensors.
CHUNK_BYTES = 160 * 2**20
MAX_CHUNK_ROWS = 256
# The gradient-ready forward (training) runs while the model's activations are held, so its
# chunk buffer adds to the step's peak; 192 rows instead of 256 take 12 MiB off it at V = 49152
# (the loss's peak 79 -> 67 MiB at N = 8192, under Liger's 72-74) for ~4-6% of the op's time
# (benchmarks/RESULTS.md). No-grad scoring keeps MAX_CHUNK_ROWS.
TRAINING_MAX_CHUNK_ROWS = 192
ROW_PLANS = True  # logprob_forward_input_grad takes a RowGrads plan (entropy gradient, row selection)
GATHERS_ROWS = True  # ... and `rows`: it gathers hidden[rows] a chunk at a time


def chunk_rows(vocab: int, chunk_bytes: int | None = None, max_rows: int | None = None) -> int:
    """Rows per chunk: CHUNK_BYTES (read at call time, so tests can shrink it) of fp32 logits,
    at most max_rows (default MAX_CHUNK_ROWS)."""
    cap = MAX_CHUNK_ROWS if max_rows is None else max_rows
    return max(1, min(cap, (CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // (4 * vocab)))


def _chunks(n: int, vocab: int, chunk_bytes: int | None, max_rows: int | None = None):
    step = chunk_rows(vocab, chunk_bytes, max_rows)
    return step, [(s, min(s + step, n)) for s in range(0, n, step)]


def _logits_into(out: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float,
                 logit_scale: float = 1.0, softcap: float | None = None, slope: Tensor | None = None) -> Tensor:
    """out[:C] ← z = transform(h @ W.T + b) in fp32 (bf16/fp16 matmuls accumulate in fp32 inside
    torch). With a soft cap and `slope`, slope[:C] ← d z / d y = (s / T) (1 - tanh²)."""
    if h.dtype == torch.float32:
        onednn_gemm.mm(h, weight.T, out=out)
    else:
        out.copy_(h @ weight.T)
    if bias is not None:
        out += bias.float()
    if softcap is None:
        if logit_scale != temperature:
            out *= logit_scale / temperature
        return out
    out *= logit_scale / softcap
    out.tanh_()
    if slope is not None:
        torch.mul(out, out, out=slope)
        slope.neg_().add_(1.0).mul_(logit_scale / temperature)
    out *= softcap / temperature
    return out


def _softmax_stats(z: Tensor, q: Tensor, y: Tensor, compute_entropy: bool):
    """Statistics of softmax(z) for a chunk: z is shifted in place, q receives exp(z - m).

    With m = row max, q = exp(z - m) and s = Σ_v q: lse = m + log s,
    logp = (z - m)[y] - log s and, with p = q / s, entropy = -Σ p log p = log s - Σ_v q (z - m) / s.
    Returns (s, lse, logp, entropy | None), each [C].
    """
    m = z.amax(dim=-1, keepdim=True)  # [C, 1]
    z -= m
    torch.exp(z, out=q)  # [C, V]
    s = q.sum(dim=-1)  # [C]
    log_s = torch.log(s)
    lse = m.squeeze(1) + log_s
    logp = z.gather(1, y.unsqueeze(1)).squeeze(1) - log_s
    entropy = None
    if compute_entropy:
        # Σ_v q (z - m) as a batched dot product: no third [C, V] temporary.
        qz = torch.bmm(q.unsqueeze(1), z.unsqueeze(2)).reshape(-1)  # [C]
        entropy = log_s - qz / s
    return s, lse, logp, entropy


class _PendingEntropyColumns:
    """Hot rows' entropy columns r = q ∘ (log q - a/S) (q [V, K'] their columns exp(z - m), S
    their sums, a = Σ_v q log q from these same columns) gathered over chunks in a [V, capacity]
    buffer; `flush` puts them through one product r^T @ W and writes F · scale into their rows of
    `dent_dh` (scale = -(s/T) / S: D' = d entropy / d h). log q = z - m; where q underflowed to 0
    it is clamped so that 0 · log q stays 0. Centred before the product, so F - (a/S) E has no
    cancellation. (The GEMM shortcut's a differs from the columns' by rounding that grows with m:
    2e-5 in D'.)"""

    def __init__(self, vocab: int, capacity: int, times_w, dent_dh: Tensor):
        self.cols = dent_dh.new_empty(vocab * capacity).view(vocab, capacity)  # [V, capacity] fp32
        self.capacity, self.times_w, self.dent_dh = capacity, times_w, dent_dh
        self.width, self.rows, self.scales = 0, [], []

    def add(self, q: Tensor, sums: Tensor, rows: Tensor, scale: Tensor) -> None:
        k = q.shape[1]
        if self.width + k > self.capacity:
            self.flush()
        if k > self.capacity:  # wide enough for a product of its own
            self.dent_dh[rows] = self.times_w(self._centred(q, sums, q)) * scale  # q is a gathered copy
            return
        self._centred(q, sums, self.cols[:, self.width:self.width + k])
        self.width += k
        self.rows.append(rows)
        self.scales.append(scale)

    def flush(self) -> None:
        if self.width:
            products = self.times_w(self.cols[:, :self.width])  # [K, H]
            self.dent_dh[torch.cat(self.rows)] = products * torch.cat(self.scales)
        self.width, self.rows, self.scales = 0, [], []

    @staticmethod
    def _centred(q: Tensor, sums: Tensor, out: Tensor) -> Tensor:
        qlogq = torch.log(q).clamp_min_(-1e30).mul_(q)  # [V, K], contiguous: the sum runs fast
        centre = (qlogq.sum(dim=0) / sums).neg_().unsqueeze(0)  # [1, K] -a/S
        return torch.addcmul(qlogq, q, centre, out=out)  # one pass into the (strided) columns


def _stat_outputs(rows_like: Tensor, compute_entropy: bool):
    """Empty (logp, lse, entropy | None), each [N] fp32, for rows_like [N, ...] (hidden or targets)."""
    n = rows_like.shape[0]
    entropy = rows_like.new_empty(n, dtype=torch.float32) if compute_entropy else None
    return rows_like.new_empty(n, dtype=torch.float32), rows_like.new_empty(n, dtype=torch.float32), entropy


def logprob_forward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float,
    compute_entropy: bool, *, logit_scale: float = 1.0, softcap: float | None = None,
    chunk_bytes: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(logp [N] fp32, lse [N] fp32, entropy [N] fp32 | None) for hidden [N, H], targets [N]."""
    n, vocab = hidden.shape[0], weight.shape[0]
    logp, lse, entropy = _stat_outputs(hidden, compute_entropy)
    step, chunks = _chunks(n, vocab, chunk_bytes)
    rows = min(step, n)
    z_buf = hidden.new_empty((rows, vocab), dtype=torch.float32)
    q_buf = hidden.new_empty((rows, vocab), dtype=torch.float32)
    for s, e in chunks:
        z = _logits_into(z_buf[: e - s], hidden[s:e], weight, bias, temperature, logit_scale, softcap)  # [C, V]
        _, lse[s:e], logp[s:e], ent = _softmax_stats(z, q_buf[: e - s], targets[s:e], compute_entropy)
        if compute_entropy:
            entropy[s:e] = ent
    return logp, lse, entropy


def logprob_forward_input_grad(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float,
    compute_entropy: bool, *, logit_scale: float = 1.0, plan=None, chunk_bytes: int | None = None,
    rows: Tensor | None = None,
):
    """Forward plus the input gradients a frozen head needs, by rows:

        D_t  = d logp_t / d h_t    = (s/T) (W[y_t] - E_t / S_t)
        D'_t = d entropy_t / d h_t = -(s/T) F_t / S_t
        with q = exp(z - m), S = Σ_v q, E = Σ_v q W_v = q @ W, a = Σ_v q (z - m),
        F = (q ∘ (z - m - a / S)) @ W  (d entropy / d z_v = -p_v (log p_v + entropy))

    `plan` (a grpo_fast.loss.logprob_function.RowGrads; None = every row gets D, no D') selects
    rows: hot rows (entropy >= plan.hot_threshold) get D, and D' when plan.entropy; cold rows get
    D only when plan.cold_logp. Returns (logp, lse, entropy, D [N, H] fp32, D' [N, H] fp32 | None,
    logp_rows [N] bool | None, entropy_rows [N] bool | None): the rows whose D / D' were computed
    (None: all of them); the others hold 0. The backward for a frozen head is then
    grad_hidden = grad_logp[:, None] * D + grad_entropy[:, None] * D'. With `rows` [N] the op's
    rows are those flat positions of hidden [*lead, H] (`gather_rows`), gathered a chunk at a
    time: no [N, H] copy of hidden.

    Each chunk of C rows is computed transposed, z^T = W @ h^T [V, C] (for few rows MKL splits
    this product over W's rows: ~1.5x the GFLOPS of h @ W^T at C = 55-256), in ONE buffer: the
    target logits are read, then the buffer is turned into q = exp(z - m) in place. When every
    row's D is needed the entropy comes from the GEMM for E: Σ_v q_v z_v = (E · h + q · b) s/T;
    when only hot rows need it, a = Σ_v q log q is summed elementwise first and the GEMMs run on
    the hot rows' columns only (the 80/20 rule's saving: 4 in 5 rows need no product with W).

    With every row's D needed, the hot rows (and so which F to compute) are known only after the
    chunk's product for E, and a product of one chunk's few hot columns alone runs at ~0.5 of the
    wide product's GFLOPS (measured at K ≈ 51 of C = 256: 0.74 against 0.37-0.42 ms a column,
    2 cores of an AVX512 EPYC).
    So their columns r gather over chunks in a [V, B/2] buffer and go through one product when it
    is full (`_PendingEntropyColumns`). (Riding as extra columns of the next chunk's product was
    tried: it makes the chunk's own columns a strided view, and the reductions over them ran 3x
    slower, eating the saving.)
    """
    entropy_grad = plan is not None and plan.entropy
    threshold = None if plan is None else plan.hot_threshold
    select = threshold is not None and not plan.cold_logp  # only the hot rows need anything
    compute_entropy = compute_entropy or entropy_grad or threshold is not None
    n, hdim = hidden.shape if rows is None else (rows.shape[0], hidden.shape[-1])
    vocab = weight.shape[0]
    f32 = torch.float32
    logp, lse, entropy = _stat_outputs(targets, compute_entropy)
    dlogp_dh = hidden.new_zeros((n, hdim), dtype=f32)
    dent_dh = hidden.new_zeros((n, hdim), dtype=f32) if entropy_grad else None
    logp_rows = hidden.new_ones(n, dtype=torch.bool) if select else None
    entropy_rows = hidden.new_zeros(n, dtype=torch.bool) if entropy_grad else None
    step, chunks = _chunks(n, vocab, chunk_bytes, TRAINING_MAX_CHUNK_ROWS)
    # fp32 on oneDNN: each chunk's product is a fresh [C, V] tensor, used as its transposed view
    # (oneDNN writes no given buffer; in this layout both products run on it without a copy)
    fresh_chunks = hidden.dtype == f32 and onednn_gemm.wants(hidden, weight)
    buf = None if fresh_chunks else hidden.new_empty(vocab * min(step, n), dtype=f32)
    inv_t = logit_scale / temperature
    bias_f = bias.float() if bias is not None else None

    def times_w(cols: Tensor) -> Tensor:  # cols [V, K] fp32 -> cols^T @ W [K, H] fp32
        # (on oneDNN: fast where cols is a [K, V] tensor's transposed view, as the chunks' q are)
        return onednn_gemm.mm(cols.t(), weight) if hidden.dtype == f32 else (cols.t().to(weight.dtype) @ weight).float()

    pending = _PendingEntropyColumns(vocab, max(1, min(step, n) // 2), times_w, dent_dh) \
        if entropy_grad and not select else None
    for s, e in chunks:
        c = e - s
        h = hidden[s:e] if rows is None else gather_rows(hidden, rows[s:e])  # [C, H]
        if fresh_chunks:
            zt = onednn_gemm.linear(h, weight).t()  # [V, C], a view of [C, V] rows
        else:
            zt = buf[: vocab * c].view(vocab, c)  # [V, C], contiguous
            if hidden.dtype == f32:
                torch.mm(weight, h.t(), out=zt)
            else:
                zt.copy_(weight @ h.t())
        if bias_f is not None:
            zt += bias_f.unsqueeze(1)
        if inv_t != 1.0:
            zt *= inv_t
        m = zt.amax(dim=0)  # [C]
        target_z = zt[targets[s:e], torch.arange(c, device=zt.device)]  # [C]
        zt -= m
        zt.exp_()  # q^T = exp(z - m)^T, in place
        sums = zt.sum(dim=0)  # [C]
        log_s = torch.log(sums)
        lse[s:e] = m + log_s
        logp[s:e] = target_z - m - log_s
        qlogq = None
        if select:  # entropy first (elementwise), then products for the hot rows only
            qlogq = torch.special.xlogy(zt, zt)  # [V, C] = q (z - m)
            a = qlogq.sum(dim=0)
            ent = log_s - a / sums
            picked = (ent >= threshold).nonzero().squeeze(1)  # [K] the chunk's hot rows (positions in it)
            logp_rows[s:e] = False
            logp_rows[s + picked] = True
            q_w = times_w(zt[:, picked]) if picked.numel() else zt.new_zeros(0, hdim)  # [K, H]
        else:
            picked = None
            q_w = times_w(zt)  # [C, H]
            a = (q_w * h.float()).sum(dim=1)  # Σ_v q_v (W_v · h)
            if bias_f is not None:
                a += torch.mv(zt.t(), bias_f)
            a = a * inv_t - m * sums  # Σ_v q_v (z_v - m)
            ent = log_s - a / sums
        if compute_entropy:
            entropy[s:e] = ent
        out = slice(s, e) if picked is None else s + picked  # the rows of D this chunk fills
        pick = slice(None) if picked is None else picked
        inv_s = (1.0 / sums[pick]).unsqueeze(1)  # [K, 1]
        dlogp_dh[out] = (weight[targets[out]].float() - q_w * inv_s) * inv_t
        if entropy_grad:
            hot = ent[pick] >= threshold if threshold is not None else torch.ones_like(inv_s[:, 0], dtype=torch.bool)
            hot_cols = hot.nonzero().squeeze(1)  # positions within the picked rows
            if hot_cols.numel():
                col = hot_cols if picked is None else picked[hot_cols]
                scale = -inv_s[hot_cols] * inv_t  # [K', 1]
                entropy_rows[s + col] = True
                if qlogq is not None:
                    q = zt[:, col]  # [V, K']
                    # q ∘ (z - m - a/S): centred before the product, so F - (a/S) E has no cancellation
                    r = qlogq[:, col]
                    r -= q * (r.sum(dim=0) / sums[col])  # a from these columns
                    dent_dh[s + col] = times_w(r) * scale
                else:
                    pending.add(zt[:, col], sums[col], s + col, scale)  # a gather: index_select(1) is 4x slower
    if pending is not None:
        pending.flush()
    return logp, lse, entropy, dlogp_dh, dent_dh, logp_rows, entropy_rows


def logprob_backward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, lse: Tensor,
    grad_logp: Tensor, temperature: float, need_grad_weight: bool, need_grad_bias: bool, *,
    logit_scale: float = 1.0, softcap: float | None = None, entropy: Tensor | None = None,
    grad_entropy: Tensor | None = None, chunk_bytes: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(grad_hidden [N, H] hidden.dtype, grad_weight [V, H] fp32 | None, grad_bias [V] fp32 | None)
    of Σ_t g_t logp_t (+ Σ_t g'_t entropy_t with grad_entropy g', which needs the forward's entropy).

    Recomputes each chunk's logits: dz = g (onehot(y) - p) - g' p (z - lse + entropy), dy = dz dz/dy;
    grad_hidden = dy @ W, grad_weight = dy.T @ hidden (fp32), grad_bias = Σ_t dy_t. Rows whose
    g and g' are both 0 (masked out by the loss) are skipped.
    """
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    grad_hidden = torch.zeros_like(hidden)
    grad_weight = hidden.new_zeros((vocab, hdim), dtype=torch.float32) if need_grad_weight else None
    grad_bias = hidden.new_zeros(vocab, dtype=torch.float32) if need_grad_bias else None
    g = grad_logp.float()
    g_ent = grad_entropy.float() if grad_entropy is not None else None
    live = (g != 0) if g_ent is None else (g != 0) | (g_ent != 0)
    rows = live.nonzero().squeeze(1)  # [M] rows with a gradient
    if rows.numel() == 0:
        return grad_hidden, grad_weight, grad_bias
    full = rows.numel() == n
    h_live = hidden if full else hidden.index_select(0, rows)
    y_live = targets if full else targets.index_select(0, rows)
    lse_live, g_live = (lse, g) if full else (lse[rows], g[rows])
    ent_live = None
    if g_ent is not None:
        ent_live, g_ent = (entropy, g_ent) if full else (entropy[rows], g_ent[rows])
    gh_live = grad_hidden if full else torch.empty_like(h_live)
    step, chunks = _chunks(rows.numel(), vocab, chunk_bytes)
    width = min(step, rows.numel())
    dz_buf = hidden.new_empty((width, vocab), dtype=torch.float32)
    slope_buf = hidden.new_empty((width, vocab), dtype=torch.float32) if softcap is not None else None
    coef_buf = hidden.new_empty((width, vocab), dtype=torch.float32) if g_ent is not None else None
    for s, e in chunks:
        c = e - s
        slope = slope_buf[:c] if slope_buf is not None else None
        dz = _logits_into(dz_buf[:c], h_live[s:e], weight, bias, temperature, logit_scale, softcap, slope)  # z
        dz -= lse_live[s:e].unsqueeze(1)  # log p
        if g_ent is not None:
            # -g' p (log p + H) - g p = -p (g + g' (log p + H))
            coef = torch.add(dz, ent_live[s:e].unsqueeze(1), out=coef_buf[:c])
            coef.mul_(g_ent[s:e].unsqueeze(1)).add_(g_live[s:e].unsqueeze(1))
            dz.exp_()
            dz.mul_(coef).neg_()
        else:
            dz.exp_()  # softmax
            dz *= -g_live[s:e].unsqueeze(1)
        dz[torch.arange(c, device=dz.device), y_live[s:e]] += g_live[s:e]
        if slope is not None:
            dz *= slope
        elif logit_scale != temperature:
            dz *= logit_scale / temperature
        if hidden.dtype == torch.float32:
            onednn_gemm.mm(dz, weight, out=gh_live[s:e])
        else:
            gh_live[s:e] = dz.to(weight.dtype) @ weight
        if need_grad_weight:
            grad_weight.addmm_(dz.T, h_live[s:e].float())
        if need_grad_bias:
            grad_bias += dz.sum(0)
    if not full:
        grad_hidden.index_copy_(0, rows, gh_live)
    return grad_hidden, grad_weight, grad_bias
