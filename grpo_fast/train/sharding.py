"""Full fine-tuning sharded across ranks with FSDP2 (`torch.distributed.fsdp.fully_shard`): each
rank holds 1/W of every weight, gradient and optimizer state, for models whose full training
state does not fit one device (`train.fsdp: true` with `lora.enabled: false`, under torchrun).
LoRA / QLoRA runs keep the replicated base and all-reduce their small adapter gradients instead.

Units: every decoder layer is one FSDP unit (gathered for its forward and again for its
backward, then freed), the rest (embeddings, final norm, LM head; a tied head is the embedding)
is the root unit. Three things differ from FSDP's usual `model(...)` use, and are why this file
exists:

- The loss takes the decoder's hidden states and the LM head's weight into the fused kernel,
  never calling the head. The decoder pass runs through `grpo_decoder_forward`, a method of the
  root registered with FSDP (`register_fsdp_forward_method`): it gathers the root unit first and,
  as FSDP does for a root, keeps it gathered until the backward, so `lm_head.weight` is the
  whole matrix when the loss reads it, and its gradient is reduce-scattered with the root's.
- Gradients are summed across ranks, not averaged: the loss normalizers are already the whole
  step's (train/update.py), so the sum is the one-process gradient. (Sum also avoids the
  PREMUL_SUM reduction that gloo does not have.)
- The sampler reads weights in place. `gathered(model)` gathers every unit for the sampling
  phase (one layer at a time, into the buffers FSDP reuses) and holds them until the phase ends;
  reshard-after-forward is off meanwhile so that nothing frees a weight the sampler points at.

The reference policy (loss.beta > 0) is a frozen copy of the starting weights, sharded the same
way (1/W of a model per rank). Checkpoints hold full (gathered) weights and an optimizer state
keyed by parameter name, so a sharded run resumes under any world size, and its saved model is
an ordinary transformers checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import types

import torch

from grpo_fast import distributed as dist
from grpo_fast.errors import ConfigError

_SHARDED = "_grpo_fsdp_units"  # attribute: the model's FSDP units, layers first, root last
_REFERENCE = "_grpo_reference_model"  # attribute: the frozen sharded reference policy


def is_sharded(model) -> bool:
    return bool(getattr(model, _SHARDED, None))


def check_config(cfg, peft_config=None) -> None:
    """train.fsdp shards full fine-tuning; adapters keep a replicated base (their gradients are
    small and all-reduced)."""
    if not cfg.train.fsdp:
        return
    if cfg.lora.enabled or peft_config is not None:
        raise ConfigError("train.fsdp: true shards full fine-tuning (lora.enabled: false); a LoRA / QLoRA run keeps "
                          "the base replicated on every rank and all-reduces its adapter gradients, so leave "
                          "train.fsdp off or set lora.enabled: false")


def shard_policy(model) -> bool:
    """Shard `model` (a plain transformers causal LM, every weight trainable) across the ranks, and
    its frozen reference copy when full_finetuning kept one. One process: nothing to shard (False)."""
    if dist.world_size() == 1:
        return False
    frozen = model.__dict__.pop("_grpo_reference", None)  # train/model.py: the starting weights
    reference = None
    if frozen is not None:
        reference = copy.deepcopy(model)
        with torch.no_grad():
            for p, start in zip(reference.parameters(), frozen):
                p.data = start
                p.requires_grad_(False)
        del frozen
        reference.eval()
        _shard(reference)
    _shard(model)
    object.__setattr__(model, _REFERENCE, reference)  # not a submodule: its weights are not the policy's
    return True


def _shard(model) -> None:
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from grpo_fast.models.causal_lm import decoder_and_head

    decoder, _ = decoder_and_head(model)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ConfigError(f"train.fsdp: {type(model).__name__} has no decoder.layers to shard one by one")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    mesh = None
    if device is not None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cuda", (dist.world_size(),))
    units = []
    for layer in layers:
        fully_shard(layer, mesh=mesh)
        units.append(layer)
    fully_shard(model, mesh=mesh)
    units.append(model)
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # Σ over ranks (see the module docstring)
        unit.set_force_sum_reduction_for_comms(True)
    object.__setattr__(model, _SHARDED, units)
    model.grpo_decoder_forward = types.MethodType(_decoder_forward, model)
    register_fsdp_forward_method(model, "grpo_decoder_forward")


def _decoder_forward(self, *args, **kwargs):
    from grpo_fast.models.causal_lm import decoder_and_head

    return decoder_and_head(self)[0](*args, **kwargs)


class ShardedDecoder:
    """The decoder stack of a sharded model as the loss calls it: a call goes through the root's
    registered method (so the root unit is gathered first); attributes are the decoder's."""

    def __init__(self, model, decoder):
        self._model, self._decoder = model, decoder

    collective = True  # every rank must run the same decoder calls (train/packed_forward.py)

    def __call__(self, *args, **kwargs):
        return self._model.grpo_decoder_forward(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._decoder, name)


def equal_passes(model, cuts: list[slice]) -> list[slice | None]:
    """Under FSDP every rank must run the same forward (and backward) passes, each gathering the
    same units in the same order: a rank whose rows split into fewer micro-batches than another
    rank's (token budgets, dynamic sampling's uneven shares) splits its largest ones further,
    and pads with idle passes (None: `idle_pass`) when it has too few rows for that. Not sharded:
    the cuts as they are."""
    if not is_sharded(model):
        return cuts
    cuts = [c for c in cuts if c.stop > c.start]
    most = max(dist.all_gather_object(len(cuts)))
    while len(cuts) < most:
        i = max(range(len(cuts)), key=lambda k: cuts[k].stop - cuts[k].start, default=None)
        if i is None or cuts[i].stop - cuts[i].start < 2:
            break
        c = cuts[i]
        mid = (c.start + c.stop) // 2
        cuts[i:i + 1] = [slice(c.start, mid), slice(mid, c.stop)]
    return cuts + [None] * (most - len(cuts))


def idle_pass(policy, *, backward: bool) -> None:
    """One pad token through the decoder and a zero loss on it and the LM head: this rank's part
    of a pass's FSDP collectives (its all-gathers, and with backward its reduce-scatters of zero
    gradients) when it has no rows left for that pass."""
    ids = torch.zeros((1, 1), dtype=torch.long, device=local_shard(policy.head.weight).device)
    hidden = policy.decoder(input_ids=ids).last_hidden_state  # [1, 1, H]
    if backward:
        (hidden.sum() * 0 + policy.head.weight.sum() * 0).backward()


def reference_model(model):
    """The frozen sharded reference policy, or None (not sharded, or beta = 0)."""
    return getattr(model, _REFERENCE, None)


@contextlib.contextmanager
def gathered(model):
    """Every weight of a sharded model whole for the duration (the sampling phase); a plain model
    as it is."""
    units = getattr(model, _SHARDED, None)
    if not units:
        yield model
        return
    for unit in units:
        unit.set_reshard_after_forward(False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model)  # the root stays gathered into its backward


def full_state(model) -> dict | None:
    """The whole model's weights on rank 0 (CPU tensors; None on the other ranks). A collective:
    every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_main():
        return None
    # a tied head once, under the embedding's name (as save_pretrained writes an unsharded model)
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in state.items() if k in names}


def full_optimizer_state(model, optimizer) -> dict | None:
    """The optimizer state keyed by parameter name, gathered on rank 0 (None elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if dist.is_main() else None


def load_full_state(model, state: dict) -> None:
    """Whole weights (every rank passes the same) into a sharded model: each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def load_full_optimizer_state(model, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def local_value(x):
    """A float of a reduction that may be a DTensor (the grad norm of sharded gradients)."""
    full = getattr(x, "full_tensor", None)
    return float(full() if callable(full) else x)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (a DTensor); any other tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t
