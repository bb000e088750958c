"""Llama-family decoder run through its own HF submodules, with attention left to the caller.

Supported: Llama (SmolLM2 included), Qwen2 / Qwen2.5, Qwen3, Mistral. Every weight-bearing step —
embedding, RMSNorms, q/k/v/o projections (with Qwen2's qkv bias), Qwen3's per-head q/k norms, the
MLP, lm_head (tied or not) — is a call of the model's own module, so bitsandbytes ``Linear4bit``
and peft LoRA layers run unchanged and the sampler always sees the live policy. (One exception,
same math: a plain, unhooked CPU ``nn.Linear`` at decode size is computed from its own weight in
the faster orientation, see ``decode_fast_paths``.) RoPE cos/sin come
from the model's own rotary module, so every RoPE-scaling variant (linear, dynamic, yarn, llama3,
longrope) is whatever transformers computes. Only attention is replaced: the caller passes an
``attend(layer_idx, q, k, v) -> out`` callback that owns the KV cache.

Tokens are processed flat (varlen): hidden states are ``[T, hidden]`` with no batch dimension;
``positions[T]`` gives each token's position inside its own sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from grpo_fast.models.causal_lm import unwrap_causal_lm
from grpo_fast.models.decode_fast_paths import FastPaths, Rotary, rms_norm

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")

# attend(layer_idx, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> [T, Hq, D]
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AttentionShape:
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    # Tokens a layer may attend back to, None = full causal attention.
    sliding_window: int | None


class LlamaFamily:
    """Flat-token forward of a Llama-family causal LM with pluggable attention. ``fast``: its
    decode fast paths with their memo (the model runner opens one ``fast.scope()`` per generate
    call)."""

    def __init__(self, model: nn.Module):
        self.fast = FastPaths()
        lm = unwrap_causal_lm(model)
        config = getattr(lm, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            arch = (getattr(config, "architectures", None) or [type(lm).__name__])[0]
            raise ValueError(
                f"model: architecture {arch!r} (model_type={model_type!r}) is not supported by the "
                f"paged sampler; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self.model_type = model_type
        self.config = config
        self.decoder = lm.model  # the *Model: embed_tokens, layers, norm, rotary_emb
        self.lm_head = lm.get_output_embeddings()
        self.layers = list(self.decoder.layers)[: config.num_hidden_layers]
        attn0 = self.layers[0].self_attn
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.shape = AttentionShape(
            num_layers=len(self.layers),
            num_q_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            scale=float(getattr(attn0, "scaling", head_dim**-0.5)),
            sliding_window=active_sliding_window(config),
        )

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of hidden states (and so of K/V): that of the embedding table."""
        return self.decoder.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        attend: AttendFn,
        logits_index: torch.Tensor | None = None,  # [S] rows of T whose logits are wanted
    ) -> torch.Tensor:
        """Logits ``[S, V]`` in fp32 for the tokens at ``logits_index`` (all tokens if None).

        Per layer: h += o_proj(attend(rope(q), rope(k), v)); h += mlp(norm(h)); the final norm
        and lm_head run only on the selected rows, so a prefill never builds ``[T, V]``.
        """
        hidden, rotary = self.embed(input_ids, positions)
        num_tokens = input_ids.shape[0]
        d = self.shape.head_dim
        for idx, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = rms_norm(layer.input_layernorm, hidden)
            q, k, v = self.fast.linears((attn.q_proj, attn.k_proj, attn.v_proj), x)
            q = q.view(num_tokens, -1, d)  # [T, Hq, D]
            k = k.view(num_tokens, -1, d)  # [T, Hkv, D]
            v = v.view(num_tokens, -1, d)  # [T, Hkv, D]
            if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head, before RoPE
                q = rms_norm(attn.q_norm, q)
                k = rms_norm(attn.k_norm, k)
            q, k = rotary(q, k)
            out = attend(idx, q, k.contiguous(), v.contiguous())  # [T, Hq, D]
            # The residual stream is this call's own tensor (a fresh embedding lookup): added to in place.
            self.fast.linear_add_(hidden, attn.o_proj, out.reshape(num_tokens, -1))
            self.fast.gated_mlp_add_(hidden, layer.mlp, rms_norm(layer.post_attention_layernorm, hidden))
        return self.logits(hidden, logits_index)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, Rotary]:
        """(hidden [T, H], the RoPE of these positions): the input of the first layer."""
        hidden = self.decoder.embed_tokens(input_ids)  # [T, H]
        # The rotary module wants a batch dim: cos/sin [1, T, D].
        cos, sin = self.decoder.rotary_emb(hidden, positions.unsqueeze(0))
        return hidden, Rotary(cos[0], sin[0])

    def logits(self, hidden: torch.Tensor, logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm and lm_head over the rows at logits_index (all if None): fp32 [S, V]."""
        if logits_index is not None:
            hidden = hidden.index_select(0, logits_index)
        return self.fast.lm_head(self.lm_head, rms_norm(self.decoder.norm, hidden))  # [S, V]


def active_sliding_window(config) -> int | None:
    """The smallest active sliding window of any layer, or None when all layers attend fully."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window
