"""Llama-family decoder run through its own HF submodules, with attention left to the caller.

Supported: Llama (SmolLM2 included), Qwen2 / Qwen2.5, Qwen3, Mistral. Every weight-bearing step —
embedding, RMSNorms, q/k/v/o projections (with Qwen2's qkv bias), Qwen3's per-head q/k norms, the
MLP, lm_head (tied or not) — is a call of the model's own module, so bitsandbytes ``Linear4bit``
and peft LoRA layers run unchanged and the sampler always sees the live policy. (One exception,
same math: a plain, unhooked CPU ``nn.Linear`` at decode size is computed from its own weight in
the faster orientation, see ``_linear``.) RoPE cos/sin come
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

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")

# attend(layer_idx, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> [T, Hq, D]
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` module inside a peft wrapper (``model.base_model.model``), or the model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


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
    """Flat-token forward of a Llama-family causal LM with pluggable attention."""

    def __init__(self, model: nn.Module):
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
        hidden = self.decoder.embed_tokens(input_ids)  # [T, H]
        # The rotary module wants a batch dim: cos/sin [1, T, D] -> [T, 1, D] to broadcast over heads.
        cos, sin = self.decoder.rotary_emb(hidden, positions.unsqueeze(0))
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [T, 1, D]
        half = sin.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)  # sign of rotate_half folded in
        num_tokens = input_ids.shape[0]
        d = self.shape.head_dim
        for idx, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = _linear(attn.q_proj, x).view(num_tokens, -1, d)  # [T, Hq, D]
            k = _linear(attn.k_proj, x).view(num_tokens, -1, d)  # [T, Hkv, D]
            v = _linear(attn.v_proj, x).view(num_tokens, -1, d)  # [T, Hkv, D]
            if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head, before RoPE
                q = attn.q_norm(q)
                k = attn.k_norm(k)
            q = _rope(q, cos, sin)
            k = _rope(k, cos, sin)
            out = attend(idx, q, k.contiguous(), v.contiguous())  # [T, Hq, D]
            hidden = hidden + _linear(attn.o_proj, out.reshape(num_tokens, -1))
            hidden = hidden + _mlp(layer.mlp, layer.post_attention_layernorm(hidden))
        if logits_index is not None:
            hidden = hidden.index_select(0, logits_index)
        return self._logits(self.decoder.norm(hidden))  # [S, V]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return _lm_head(self.lm_head, hidden)  # [S, V]


# Gated MLPs of the supported families: down(act(gate(x)) * up(x)).
_GATED_MLPS = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP")
# Up to this many rows, a plain CPU Linear runs as (W @ x^T)^T (see _linear).
_SMALL_M = 256


def _unhooked(module: nn.Module) -> bool:
    return not module._forward_hooks and not module._forward_pre_hooks and not hasattr(module, "_hf_hook")


def _plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and _unhooked(module)


def _lora_terms(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, float]] | None:
    """[(A [r, in], B [out, r], scaling)] of the active adapters of an unmerged, vanilla peft LoRA
    ``Linear`` over a plain ``nn.Linear`` (no DoRA or other variant, no LoRA bias, dropout off),
    or None when the layer is anything else and must be called as a module."""
    cls = type(module)
    if cls.__name__ != "Linear" or not cls.__module__.startswith("peft.tuners.lora"):
        return None
    base = getattr(module, "base_layer", None)
    if base is None or not _plain_linear(base) or not _unhooked(module) or getattr(module, "merged", True):
        return None
    if getattr(module, "fan_in_fan_out", False) or getattr(module, "lora_variant", None):
        return None
    if module.disable_adapters:
        return []
    terms = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        lora_a, lora_b, dropout = module.lora_A[name], module.lora_B[name], module.lora_dropout[name]
        if not (_plain_linear(lora_a) and _plain_linear(lora_b)) or lora_b.bias is not None or lora_a.bias is not None:
            return None
        if dropout.training and type(dropout) is not nn.Identity:
            return None
        if lora_a.weight.dtype != base.weight.dtype:
            return None
        terms.append((lora_a.weight, lora_b.weight, float(module.scaling[name])))
    return terms


def _fast_parts(module: nn.Module, x: torch.Tensor):
    """(base nn.Linear, LoRA terms) when module(x) may take the transposed CPU path, else None."""
    if x.device.type != "cpu" or x.dim() != 2 or x.shape[0] > _SMALL_M:
        return None
    if _plain_linear(module):
        base, terms = module, []
    else:
        terms = _lora_terms(module)
        if terms is None:
            return None
        base = module.base_layer
    return (base, terms) if base.weight.dtype == x.dtype else None


def _linear_t(parts, xt: torch.Tensor) -> torch.Tensor:
    """module(x)^T = W @ x^T + b + sum_i s_i * B_i @ (A_i @ x^T): xt [K, M] -> [N, M]."""
    base, terms = parts
    out_t = torch.mm(base.weight, xt)  # [N, M]
    for weight_a, weight_b, scaling in terms:
        out_t.addmm_(weight_b, torch.mm(weight_a, xt), alpha=scaling)  # += s * B @ (A @ x^T)
    if base.bias is not None:
        out_t += base.bias.unsqueeze(1)
    return out_t


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x), with one CPU fast path for few rows (decode) when the layer is a plain
    ``nn.Linear`` (exact type, no hooks) or a vanilla peft LoRA over one: (W @ x^T)^T, the same
    dot products as x @ W^T, plus s * (B @ (A @ x^T))^T per adapter. With few rows MKL splits
    x @ W^T over the rows, so every thread streams the whole weight from memory; W @ x^T is split
    over the weight's rows, and each thread reads its share once (seen here, 2 threads, 32 rows:
    ~1.5-2x faster; decode is weight-bandwidth bound). The weights are read at call time, so the
    live policy is what runs. 4-bit, hooked or any other layers are called as modules, unchanged."""
    parts = _fast_parts(module, x)
    if parts is None:
        return module(x)
    return _linear_t(parts, x.t()).t().contiguous()


def _lm_head(module: nn.Module, x: torch.Tensor, rows_per_chunk: int = 4096) -> torch.Tensor:
    """Logits [M, V] fp32. On the fast path the [V, M] product is made a vocabulary chunk at a
    time and each chunk transposed into place while it is still in cache (one transposing copy
    of the whole [V, M] product reads it with a stride of M floats)."""
    parts = _fast_parts(module, x)
    if parts is None or parts[1]:
        return _linear(module, x).float()
    base = parts[0]
    xt = x.t()  # [H, M]
    vocab = base.weight.shape[0]
    out = torch.empty(x.shape[0], vocab, dtype=x.dtype, device=x.device)  # [M, V]
    for s in range(0, vocab, rows_per_chunk):
        e = min(s + rows_per_chunk, vocab)
        chunk = torch.mm(base.weight[s:e], xt)  # [C, M]
        if base.bias is not None:
            chunk += base.bias[s:e].unsqueeze(1)
        out[:, s:e] = chunk.t()
    return out.float()


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """mlp(x); the known gated MLPs are unrolled so their projections can take _linear's path,
    and on the fast path the whole MLP runs transposed (act(G x^T) * (U x^T) is [I, M],
    contiguous, and is already the x^T the down projection wants): one transposing copy of the
    [M, H] output instead of three."""
    if type(mlp).__name__ not in _GATED_MLPS or not _unhooked(mlp):
        return mlp(x)
    gate, up, down = (_fast_parts(m, x) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    if gate is None or up is None or down is None:
        return _linear(mlp.down_proj, mlp.act_fn(_linear(mlp.gate_proj, x)) * _linear(mlp.up_proj, x))
    xt = x.t()  # [H, M]
    inner_t = mlp.act_fn(_linear_t(gate, xt)).mul_(_linear_t(up, xt))  # [I, M]
    return _linear_t(down, inner_t).t().contiguous()  # [M, H]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x*cos + rotate_half(x)*sin, the HF convention (halves, not interleaved pairs), where
    rotate_half(x) = cat(-x2, x1): written as cat(x2, x1) * cat(-sin1, sin2) to save the negation."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, swapped, sin_signed)


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
