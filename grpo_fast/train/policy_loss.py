"""The one place the trainer meets the loss: hidden states of the completion tokens (the packed
training forward) -> `grpo_fast.ops` (fused loss, selective log-probs). The policy's decoder and
LM head come resolved once per step (`PolicyModules`); the logits' transform (temperature, and a
model's own scale or soft cap) is read from its config and checked against its forward once.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from grpo_fast.errors import ModelError
from grpo_fast.loss.head import LogitTransform, logit_transform_of
from grpo_fast.ops import fused_grpo_loss, selective_logprobs
from grpo_fast.train.group_prompts import GroupPrompts
from grpo_fast.train.model import PolicyModules, policy_modules, reference_policy
from grpo_fast.train.packed_forward import PromptPrefix, completion_hidden
from grpo_fast.train.rollout_batch import SequenceBatch
from grpo_fast.train.sharding import idle_pass
from grpo_fast.thread_governor import ThreadGovernor, paced

_CHECKED_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # head module -> LogitTransform at T=1


def logit_transform(policy: PolicyModules, temperature: float) -> LogitTransform:
    """The model's logit transform at this temperature: from its config (softcap, scale), checked
    once against its own forward, so that a model that post-processes its logits in a way we do
    not reproduce is refused instead of trained on wrong log-probs."""
    head = _CHECKED_HEADS.get(policy.head)
    if head is None:
        head = logit_transform_of(policy.model.config)
        _check_head(policy, head)
        _CHECKED_HEADS[policy.head] = head
    return head._replace(temperature=float(temperature))


@torch.no_grad()
def _check_head(policy: PolicyModules, head: LogitTransform) -> None:
    vocab = policy.head.weight.shape[0]
    ids = (torch.arange(1, 5) % vocab).unsqueeze(0).to(policy.head.weight.device)  # [1, 4]
    was_training = policy.model.training
    policy.model.eval()
    try:
        theirs = policy.model(input_ids=ids).logits.float()  # [1, 4, V]
        hidden = policy.decoder(input_ids=ids).last_hidden_state
    finally:
        policy.model.train(was_training)
    weight = policy.head.weight  # after the forward: a sharded head is whole only then
    raw = hidden.float() @ weight.float().T
    if policy.head.bias is not None:
        raw = raw + policy.head.bias.float()
    ours = head.apply(raw)
    low_precision = weight.dtype in (torch.bfloat16, torch.float16) or hidden.dtype != torch.float32
    tol = (2e-2 if low_precision else 1e-4) * max(1.0, float(theirs.abs().max())) + 1e-4
    err = float((ours - theirs).abs().max())
    if not err <= tol:
        raise ModelError(f"{type(policy.model).__name__}: its logits are not transform(hidden @ lm_head.weight.T + "
                         f"bias) for any transform grpo-fast reproduces (scale {head.scale}, soft cap {head.softcap}; "
                         f"max difference {err:.3g} > {tol:.3g}); training it would use wrong log-probs")


@torch.no_grad()
def score_logprobs(policy: PolicyModules, batch: SequenceBatch, *, temperature: float, reference: bool = False,
                   micro_batch_size: int = 0, return_entropy: bool = False, cuts: list[slice] | None = None,
                   threads: ThreadGovernor | None = None):
    """Per-token log-probs [N, C] fp32 of the completions under the policy (or, with
    reference=True, the reference policy = adapters disabled); 0 where mask = 0. With
    return_entropy, also the entropies [N, C] (the same pass: no extra product with the head).
    One forward per row slice of `cuts` (train.micro_batches), else per micro_batch_size rows,
    each on the thread count `threads` picks (grpo_fast.thread_governor; None: torch's)."""
    transform = logit_transform(policy, temperature)
    step = micro_batch_size or len(batch)
    cuts = cuts or [slice(start, start + step) for start in range(0, len(batch), step)]
    outs, ents = [], []
    # a group split across `cuts` runs its prompt once (grpo_fast.train.group_prompts); decided
    # with the scorer's decoder, which exists only inside its block: None until then, False for no
    prompts: GroupPrompts | bool | None = None
    for rows in cuts:
        if rows is None:  # FSDP: this rank's share of a pass it has no rows for
            with _scorer(policy, reference) as scorer:
                idle_pass(scorer, backward=False)
            continue
        part = batch.select(rows)
        # The reference's head as well as its decoder: a full fine-tuning run trains the head too
        # (the frozen weights are swapped in only inside the block), and a sharded head is whole
        # only after its model's forward.
        with _scorer(policy, reference) as scorer, paced(threads):
            if prompts is None:
                prompts = GroupPrompts.for_pass(scorer.decoder, batch, cuts) or False
            hidden = completion_hidden(scorer.decoder, part, prefix=prompts.prefix(rows) if prompts else None)
            if prompts:
                prompts.finish(rows)
            head = scorer.head
            out = selective_logprobs(hidden, head.weight.to(hidden.dtype), part.targets, temperature=temperature,
                                     bias=head.bias, mask=part.mask, return_entropy=return_entropy,
                                     logit_scale=transform.scale, final_logit_softcapping=transform.softcap)
        if return_entropy:
            outs.append(out[0])
            ents.append(out[1])
        else:
            outs.append(out)
    if not outs:  # a rank with no rows (FSDP idle passes only)
        empty = batch.targets.new_zeros(batch.targets.shape, dtype=torch.float32)
        return (empty, empty.clone()) if return_entropy else empty
    logp = torch.cat(outs, 0).float()
    return (logp, torch.cat(ents, 0).float()) if return_entropy else logp


@contextlib.contextmanager
def _scorer(policy: PolicyModules, reference: bool):
    """The modules that score: the policy's, or for the duration those of its reference policy."""
    if not reference:
        yield policy
        return
    with reference_policy(policy.model) as model:
        yield policy if model is policy.model else policy_modules(model)


def policy_loss(policy: PolicyModules, batch: SequenceBatch, advantages: torch.Tensor, old_logprobs, ref_logprobs, *,
                loss_cfg, temperature: float, max_completion_length: int, num_items_in_batch: float,
                num_sequences_in_batch: int, entropy_threshold=None, num_entropy_items_in_batch=None,
                entropy_coef: float | None = None, sampling_logprobs: torch.Tensor | None = None,
                prompt_prefix: PromptPrefix | None = None):
    """fused_grpo_loss on one micro-batch with every option of the loss section. The normalizers
    (num_items_in_batch, num_sequences_in_batch, and for the high-entropy mask and the entropy
    bonus entropy_threshold and num_entropy_items_in_batch) are those of the whole step, so the
    micro-batch losses add up to the step's loss and their gradients to the step's gradient.
    entropy_coef: this step's coefficient (adaptive control), default loss_cfg.entropy_coef.
    prompt_prefix: the rows' prompts already run (grpo_fast.train.group_prompts)."""
    head = policy.head
    transform = logit_transform(policy, temperature)
    hidden = completion_hidden(policy.decoder, batch, prefix=prompt_prefix)
    lc = loss_cfg
    return fused_grpo_loss(
        hidden, head.weight.to(hidden.dtype), batch.targets, batch.mask, advantages, old_logprobs, ref_logprobs,
        loss_type=lc.loss_type, beta=lc.beta, epsilon_low=lc.epsilon, epsilon_high=lc.epsilon_high, delta=lc.delta,
        temperature=temperature, importance_sampling_level=lc.importance_sampling_level,
        max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch, bias=head.bias,
        num_sequences_in_batch=num_sequences_in_batch, sapo_temperature_pos=lc.sapo_temperature_pos,
        sapo_temperature_neg=lc.sapo_temperature_neg, vespo_k_pos=lc.vespo_k_pos, vespo_lambda_pos=lc.vespo_lambda_pos,
        vespo_k_neg=lc.vespo_k_neg, vespo_lambda_neg=lc.vespo_lambda_neg,
        use_bias_correction_kl=lc.use_bias_correction_kl, top_entropy_quantile=lc.top_entropy_quantile,
        entropy_threshold=entropy_threshold,
        entropy_coef=lc.entropy_coef if entropy_coef is None else entropy_coef,
        num_entropy_items_in_batch=num_entropy_items_in_batch, off_policy_mask_threshold=lc.off_policy_mask_threshold,
        sampling_logprobs=sampling_logprobs, sampling_correction=lc.sampling_correction,
        sampling_correction_clip_min=lc.sampling_correction_clip_min,
        sampling_correction_clip_max=lc.sampling_correction_clip_max, logit_scale=transform.scale,
        final_logit_softcapping=transform.softcap)
