"""Chunked PyTorch backend of the selective log-prob op (the fast path for CPU tensors).

Same contract as the Triton backend `grpo_fast.kernels.logprob`. Per token t (one row of the
compacted hidden states) with target y_t:

    z_t = (h_t @ W.T + b) / T                        [V] fp32 (matmul in the input dtype, torch
                                                     accumulates in fp32; fp32 from here on)
    lse_t = logsumexp_v z_t,   logp_t = z_t[y_t] - lse_t
    entropy_t = lse_t - Σ_v softmax(z_t)_v z_t
    d logp_t / d z_t = onehot(y_t) - softmax(z_t)  →  dz_t = g_t (onehot - p_t) / T

Rows are processed CHUNK_BYTES of fp32 logits (at most MAX_CHUNK_ROWS rows) at a time in buffers
allocated once per call (a fresh [C, V] tensor per chunk fragments the malloc heap: RSS then
grows to several chunks), so the extra memory is one or two [C, V] buffers instead of [N, V]
tensors.

Besides the contract, `logprob_forward_input_grad` serves a frozen head (no grad to W or b):
since d logp_t / d h_t = (W[y_t] - p_t @ W) / T, the forward multiplies the probabilities it
already holds by W once more and the backward needs no matmul at all — two matmuls of N·V·H in
total instead of three (forward, recomputed logits, dz @ W). Measured in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import torch
from torch import Tensor

# fp32 logits per chunk buffer, and at most MAX_CHUNK_ROWS rows: the GEMMs of a chunk run at
# ~60 GFLOPS on 2 AVX2 cores from ~256 rows on, but at ~30-40 with 55 rows (what 32 MiB gave
# for V = 152k); 256 rows of V = 152k are 155 MB, far under the naive path's [N, V] tensors.
CHUNK_BYTES = 160 * 2**20
MAX_CHUNK_ROWS = 256


def chunk_rows(vocab: int, chunk_bytes: int | None = None) -> int:
    """Rows per chunk: CHUNK_BYTES (read at call time, so tests can shrink it) of fp32 logits,
    at most MAX_CHUNK_ROWS."""
    return max(1, min(MAX_CHUNK_ROWS, (CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // (4 * vocab)))


def _chunks(n: int, vocab: int, chunk_bytes: int | None):
    step = chunk_rows(vocab, chunk_bytes)
    return step, [(s, min(s + step, n)) for s in range(0, n, step)]


def _logits_into(out: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    """out[:C] ← (h @ W.T + b) / T in fp32; bf16/fp16 matmuls accumulate in fp32 inside torch."""
    if h.dtype == torch.float32:
        torch.mm(h, weight.T, out=out)
    else:
        out.copy_(h @ weight.T)
    if bias is not None:
        out += bias.float()
    if temperature != 1.0:
        out *= 1.0 / temperature
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


def _stat_outputs(hidden: Tensor, compute_entropy: bool):
    """Empty (logp, lse, entropy | None), each [N] fp32, for hidden [N, H]."""
    n = hidden.shape[0]
    entropy = hidden.new_empty(n, dtype=torch.float32) if compute_entropy else None
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32), entropy


def logprob_forward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float,
    compute_entropy: bool, chunk_bytes: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(logp [N] fp32, lse [N] fp32, entropy [N] fp32 | None) for hidden [N, H], targets [N]."""
    n, vocab = hidden.shape[0], weight.shape[0]
    logp, lse, entropy = _stat_outputs(hidden, compute_entropy)
    step, chunks = _chunks(n, vocab, chunk_bytes)
    rows = min(step, n)
    z_buf = hidden.new_empty((rows, vocab), dtype=torch.float32)
    q_buf = hidden.new_empty((rows, vocab), dtype=torch.float32)
    for s, e in chunks:
        z = _logits_into(z_buf[: e - s], hidden[s:e], weight, bias, temperature)  # [C, V]
        _, lse[s:e], logp[s:e], ent = _softmax_stats(z, q_buf[: e - s], targets[s:e], compute_entropy)
        if compute_entropy:
            entropy[s:e] = ent
    return logp, lse, entropy


def logprob_forward_input_grad(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float,
    compute_entropy: bool, chunk_bytes: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Forward plus D = d logp / d hidden = (W[y] - softmax(z) @ W) / T, [N, H] fp32.

    The backward for a frozen head is then grad_hidden = grad_logp[:, None] * D.

    Each chunk of C rows is computed transposed, z^T = W @ h^T [V, C] (for few rows MKL splits
    this product over W's rows: ~1.5x the GFLOPS of h @ W^T at C = 55-256), in ONE buffer: the
    target logits are read, then the buffer is turned into q = exp(z - m) in place. The entropy
    needs no second [V, C] tensor either, because the GEMM for E_p[W] already gives
    Σ_v q_v z_v = (q^T W · h + q · b) / T - m Σ_v q_v.
    """
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    f32 = torch.float32
    logp, lse, entropy = _stat_outputs(hidden, compute_entropy)
    dlogp_dh = hidden.new_empty((n, hdim), dtype=f32)
    step, chunks = _chunks(n, vocab, chunk_bytes)
    buf = hidden.new_empty(vocab * min(step, n), dtype=f32)
    inv_t = 1.0 / temperature
    bias_f = bias.float() if bias is not None else None
    for s, e in chunks:
        c = e - s
        h = hidden[s:e]  # [C, H]
        zt = buf[: vocab * c].view(vocab, c)  # [V, C], contiguous
        if hidden.dtype == f32:
            torch.mm(weight, h.t(), out=zt)
        else:
            zt.copy_(weight @ h.t())
        if bias_f is not None:
            zt += bias_f.unsqueeze(1)
        if temperature != 1.0:
            zt *= inv_t
        m = zt.amax(dim=0)  # [C]
        target_z = zt[targets[s:e], torch.arange(c, device=zt.device)]  # [C]
        zt -= m
        zt.exp_()  # q^T = exp(z - m)^T, in place
        sums = zt.sum(dim=0)  # [C]
        log_s = torch.log(sums)
        lse[s:e] = m + log_s
        logp[s:e] = target_z - m - log_s
        q_w = torch.mm(zt.t(), weight) if hidden.dtype == f32 else (zt.t().to(weight.dtype) @ weight).float()  # [C, H]
        if compute_entropy:
            qz = (q_w * h.float()).sum(dim=1)  # [C] = Σ_v q_v (W_v · h)
            if bias_f is not None:
                qz += torch.mv(zt.t(), bias_f)
            qz = qz * inv_t - m * sums  # Σ_v q_v (z_v - m)
            entropy[s:e] = log_s - qz / sums
        torch.sub(weight[targets[s:e]].float(), q_w / sums.unsqueeze(1), out=dlogp_dh[s:e])
    if temperature != 1.0:
        dlogp_dh *= inv_t
    return logp, lse, entropy, dlogp_dh


def logprob_backward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, lse: Tensor,
    grad_logp: Tensor, temperature: float, need_grad_weight: bool, need_grad_bias: bool,
    chunk_bytes: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(grad_hidden [N, H] hidden.dtype, grad_weight [V, H] fp32 | None, grad_bias [V] fp32 | None).

    Recomputes each chunk's logits: dz = g (onehot(y) - exp(z - lse)) / T, grad_hidden = dz @ W,
    grad_weight = dz.T @ hidden (fp32), grad_bias = Σ_t dz_t.
    """
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    grad_hidden = torch.empty_like(hidden)
    grad_weight = hidden.new_zeros((vocab, hdim), dtype=torch.float32) if need_grad_weight else None
    grad_bias = hidden.new_zeros(vocab, dtype=torch.float32) if need_grad_bias else None
    scale = grad_logp.float() / temperature  # [N]
    step, chunks = _chunks(n, vocab, chunk_bytes)
    dz_buf = hidden.new_empty((min(step, n), vocab), dtype=torch.float32)
    for s, e in chunks:
        dz = _logits_into(dz_buf[: e - s], hidden[s:e], weight, bias, temperature)  # [C, V]
        dz -= lse[s:e].unsqueeze(1)
        dz.exp_()  # softmax
        dz *= -scale[s:e].unsqueeze(1)
        rows = torch.arange(e - s, device=dz.device)
        dz[rows, targets[s:e]] += scale[s:e]
        if hidden.dtype == torch.float32:
            torch.mm(dz, weight, out=grad_hidden[s:e])
        else:
            grad_hidden[s:e] = dz.to(weight.dtype) @ weight
        if need_grad_weight:
            grad_weight.addmm_(dz.T, hidden[s:e].float())
        if need_grad_bias:
            grad_bias += dz.sum(0)
    return grad_hidden, grad_weight, grad_bias
