"""The public fused ops: the GRPO loss and selective log-probs straight from hidden states
(re-exported as `grpo_fast.ops`).

Neither op ever holds the [N, V] logits: the backend computes each token's log-prob and entropy
from the hidden state and the LM head chunk by chunk (CPU) or tile by tile (Triton), and the GRPO
objective then runs on [B, T] per-token values (`grpo_fast.loss.objective`).

Backends: "triton" (CUDA tensors; on CPU tensors only under TRITON_INTERPRET=1, which is how the
tests run the kernels), "cpu" (chunked PyTorch; any device). None picks triton for CUDA tensors
and cpu otherwise.
"""
from __future__ import annotations

import torch
from torch import Tensor

from grpo_fast import checks
from grpo_fast.loss.arguments import loss_call, policy_inputs
from grpo_fast.loss.head import LogitTransform
from grpo_fast.loss.logprob_function import BACKENDS, RowGrads, get_backend, selective_logprob
from grpo_fast.loss.objective import LossParams, grpo_objective
from grpo_fast.loss.rows import gather_rows

__all__ = ["fused_grpo_loss", "selective_logprobs"]


def _resolve_backend(backend: str | None, hidden: Tensor) -> str:
    if backend is None:
        return "triton" if hidden.is_cuda else "cpu"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def row_plan(p: LossParams) -> RowGrads:
    """Which tokens the loss can send a gradient to (see RowGrads): with the high-entropy mask
    (its threshold given) only the kept tokens' log-probs matter, unless the KL term or a
    sequence-level ratio (every token's log-ratio feeds its sequence's weight) reaches them all."""
    threshold = p.entropy_threshold if p.top_entropy_quantile < 1.0 else None
    cold = threshold is None or p.beta != 0.0 or p.importance_sampling_level == "sequence"
    return RowGrads(entropy=p.entropy_coef != 0.0, hot_threshold=threshold, cold_logp=cold)


def fused_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor,
    advantages: Tensor,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    *,
    loss_type: str,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    temperature: float = 1.0,
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: float | Tensor | None = None,
    bias: Tensor | None = None,
    num_sequences_in_batch: float | Tensor | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    use_bias_correction_kl: bool = True,
    top_entropy_quantile: float = 1.0,
    entropy_threshold: float | Tensor | None = None,
    entropy_coef: float = 0.0,
    num_entropy_items_in_batch: float | Tensor | None = None,
    off_policy_mask_threshold: float | None = None,
    sampling_logprobs: Tensor | None = None,
    sampling_correction: str = "none",
    sampling_correction_clip_min: float | None = None,
    sampling_correction_clip_max: float | None = 3.0,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    backend: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss without materialized logits; same arguments and results as
    `grpo_fast.loss.reference_grpo_loss` (see it and `grpo_fast.loss.objective` for the math),
    plus `backend`.

    Only tokens with mask != 0 are computed (their N rows gathered a chunk at a time where the
    backend can, else compacted to [N, H] first); fully masked sequences
    contribute 0. Gradient flows to `hidden` (zero where masked), and to `weight` / `bias` only if
    they require grad; with entropy_coef != 0 it includes the entropy bonus's. Metrics are
    detached 0-dim fp32 tensors on hidden's device.
    """
    call = loss_call(**locals())  # every argument above, by name: checked in one place
    name = _resolve_backend(backend, hidden)

    B, T, H = hidden.shape
    keep = mask != 0  # [B, T]
    idx = keep.reshape(-1).nonzero().squeeze(1)  # [N], row-major like boolean indexing
    targets_c = targets[keep].long().contiguous()  # [N]
    if idx.numel() == 0:
        # Nothing to score: a zero loss that still reaches hidden, so backward() works.
        logp_c = hidden[keep].float().sum(-1)  # [0]
        entropy_c = logp_c
    else:  # the kept rows are gathered by the op (a chunk at a time where the backend can)
        logp_c, entropy_c = selective_logprob(
            hidden, weight.contiguous(), None if bias is None else bias.contiguous(), targets_c, call.head, name,
            compute_entropy=True, plan=row_plan(call.params), rows=idx)

    flat = logp_c.new_zeros(B * T)  # [B*T] fp32, 0 where masked
    logp = flat.index_copy(0, idx, logp_c).view(B, T)
    entropy = flat.index_copy(0, idx, entropy_c).view(B, T)
    if call.params.entropy_coef == 0.0:
        entropy = entropy.detach()
    inputs = policy_inputs(logp, mask, advantages, old_logprobs, ref_logprobs, entropy, sampling_logprobs)
    return grpo_objective(inputs, call.params)


@torch.no_grad()
def selective_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    bias: Tensor | None = None,
    backend: str | None = None,
    mask: Tensor | None = None,
    *,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """log softmax(z)[targets] in fp32, without gradient; z = (hidden @ weight.T + bias) / temperature
    (× logit_scale, soft-capped by final_logit_softcapping: `grpo_fast.loss.head`).

    For scoring old / reference log-probs. Shapes: hidden [B, T, H] with targets [B, T] gives
    [B, T]; hidden [N, H] with targets [N] gives [N]. With `mask` (same shape as targets) only
    positions with mask != 0 are computed; the others are 0. `return_entropy=True` also returns
    the entropy of each position's distribution (same shape).
    """
    checks.tensor("hidden", hidden, floating=True, contiguous=False)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be a [B, T, H] or [N, H] tensor, got shape {tuple(hidden.shape)}")
    H, dev = hidden.shape[-1], hidden.device
    checks.tensor("weight", weight, device=dev, shape=("V", H), contiguous=False)
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    V = weight.shape[0]
    lead = tuple(hidden.shape[:-1])
    checks.tensor("targets", targets, device=dev, shape=lead, contiguous=False)
    if targets.is_floating_point():
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if bias is not None:
        checks.tensor("bias", bias, dtypes=(weight.dtype,), device=dev, shape=(V,), contiguous=False)
    if mask is not None:
        checks.tensor("mask", mask, device=dev, shape=lead, contiguous=False)
    head = LogitTransform(temperature, logit_scale, final_logit_softcapping).check()
    name = _resolve_backend(backend, hidden)

    flat_y = targets.reshape(-1).long()  # [M]
    idx = None
    if mask is None:
        flat_h = hidden.reshape(-1, H)  # [M, H]
    else:  # only the kept rows, gathered without first copying a hidden that no view flattens
        idx = (mask.reshape(-1) != 0).nonzero().squeeze(1)  # [N]
        flat_h, flat_y = gather_rows(hidden, idx), flat_y.index_select(0, idx)
    if flat_y.numel() and (int(flat_y.min()) < 0 or int(flat_y.max()) >= V):
        raise ValueError(f"targets must lie in [0, V={V})")

    if flat_y.numel() == 0:
        logp = entropy = hidden.new_zeros(0, dtype=torch.float32)
    else:
        logp, _, entropy = get_backend(name).logprob_forward(
            flat_h.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
            flat_y.contiguous(), head.temperature, return_entropy, logit_scale=head.scale, softcap=head.softcap)

    def unflatten(values: Tensor) -> Tensor:
        if idx is None:
            return values.view(lead)
        full = values.new_zeros(targets.numel())
        return full.index_copy(0, idx, values).view(lead)

    if return_entropy:
        return unflatten(logp), unflatten(entropy)
    return unflatten(logp)
