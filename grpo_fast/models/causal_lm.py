"""What is inside the HF causal LMs we run, wherever they are used (sampler, trainer, kernels'
eligibility checks): the model under a peft wrapper, its decoder stack and LM head, and the
class names of the module kinds the fast paths recognize.
"""

from __future__ import annotations

from torch import nn

# Gated MLPs of the supported families: down(act(gate(x)) * up(x)).
GATED_MLPS = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP")
# SiLU activation modules (transformers' own class and torch's).
SILU_ACTIVATIONS = ("SiLUActivation", "SiLU")
# weight * x / sqrt(mean(x^2) + variance_epsilon), computed in fp32, in every one of these.
RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm")


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` module inside a peft wrapper (``model.base_model.model``), or the model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder stack returning final-norm hidden states, LM head Linear) of a peft or plain causal LM."""
    lm = unwrap_causal_lm(model)
    return lm.get_decoder(), lm.get_output_embeddings()


def keep_4bit_layout(model) -> None:
    """Keep bitsandbytes' NF4 weights in their one layout. On a CPU with AVX512-BF16, bnb (seen
    with 0.49 and 0.50) repacks a Linear4bit's weight in place on its first eval-mode forward into
    a CPU-only layout: that fails outright when in_features < 2 x blocksize ("shape '[32, 0]' is
    invalid"), and it rewrites weight.data under the sampler, the trainer and the memory plan,
    which read the standard layout, and its bf16 product gives other numbers than the fp32 one
    the trainer scores with (the sampler's log-probs then disagree with the trainer's by ~2e-4).
    Whether it happens would depend on the machine; here it never does. Both the trainer and the
    sampler apply it."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
