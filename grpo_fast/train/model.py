"""Model setup: load (HF folder, GGUF, or the built-in default), 4-bit NF4, LoRA, optimizer, schedule.

The reference policy for the KL term is the same module with the LoRA adapters disabled
(`reference_policy`), so there is never a second copy of the weights.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import NamedTuple

import torch

from grpo_fast.errors import ConfigError, ModelError
from grpo_fast.models.causal_lm import decoder_and_head, keep_4bit_layout
from grpo_fast.models.source import model_source as _source


def resolve_device(cfg) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {cfg.device} requested but CUDA is not available")
    return torch.device(cfg.device)


def resolve_dtype(cfg, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX). There torch's bf16 GEMMs ran
    ~2x oneDNN's fp32 ones (~4x MKL's) and a GRPO step in bf16 1.05x one in fp32, after fp32's
    products moved to oneDNN and AVX-512 tiles (1.55x before, 1.17x before LoRA's narrow products
    followed; benchmarks/RESULTS.md, "Queries in the vector lanes"); elsewhere bf16 is emulated,
    slower than fp32."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe is not None and probe() for probe in probes)


def dtype_hint(cfg, device: torch.device) -> str | None:
    """A one-line hint when model.dtype auto chose fp32 on a CPU that computes bf16 natively (auto
    stays fp32 there: the run's numbers do not change with the machine)."""
    if cfg.dtype != "auto" or device.type != "cpu" or cfg.load_in_4bit or not native_bf16_cpu():
        return None
    return ("model.dtype auto is float32 on the CPU; this CPU computes bf16 natively (AVX512-BF16 / AMX): "
            "--model.dtype bfloat16 ran a GRPO step 1.05x faster here (benchmarks/RESULTS.md, \"Queries in the vector lanes\")")


def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    folder, gguf = _source(cfg)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(folder)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(cfg, device: torch.device | None = None, *, quantize: bool | None = None):
    """The frozen base model: fp32/bf16, or NF4 with double quant when load_in_4bit."""
    from transformers import AutoConfig, AutoModelForCausalLM

    device = device or resolve_device(cfg)
    dtype = resolve_dtype(cfg, device)
    folder, gguf = _source(cfg)
    kwargs: dict = {"dtype": dtype}
    if gguf:
        kwargs["gguf_file"] = gguf
    hf_config = AutoConfig.from_pretrained(folder, **({"gguf_file": gguf} if gguf else {}))
    # Folders converted from GGUF keep a `quantization_config` of method gguf that no longer applies.
    if getattr(hf_config, "quantization_config", None) is not None and not gguf:
        qc = hf_config.quantization_config
        if (qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)) == "gguf":
            del hf_config.quantization_config
            kwargs["config"] = hf_config
    if quantize if quantize is not None else cfg.load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute = dtype if dtype != torch.float16 or device.type == "cuda" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    attn = cfg.attn_implementation
    if attn is None:
        attn = "sdpa"
        if device.type == "cuda":
            try:
                import flash_attn  # noqa: F401

                attn = "flash_attention_2"
            except ImportError:
                pass
    kwargs["attn_implementation"] = attn
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if "quantization_config" not in kwargs:
        model.to(device)
    elif device.type == "cpu":
        _detach_from_checkpoint_file(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _detach_from_checkpoint_file(model) -> None:
    """Copy the unquantized tensors (embeddings, norms, LM head) of a 4-bit model off the
    checkpoint's memory map. They are views of it as loaded, which keeps the whole mapping alive,
    and with it every page the quantizer read: ~340 MiB of file pages in the resident set for
    SmolLM2-135M (benchmarks/RESULTS.md "Memory plan"), more than its 4-bit weights."""
    for module in model.modules():
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if type(t).__name__ == "Params4bit" or not t.is_floating_point():
                continue
            t.data = t.data.clone()


def lora_targets(model) -> list[str]:
    """Leaf names of every linear layer inside the transformer blocks (q/k/v/o, gate/up/down...),
    never the LM head or embeddings."""
    names = set()
    for name, module in model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")
        if is_linear and ".layers." in f".{name}":
            names.add(name.rsplit(".", 1)[-1])
    if not names:
        raise ConfigError("lora.target_modules: found no linear layers inside the model's blocks; set them explicitly")
    return sorted(names)


def load_policy(model_cfg, lora_cfg, *, seed: int = 0, model=None, peft_config=None, tokenizer=None, echo=None,
                keep_reference: bool = False):
    """The policy to train -> (peft model, tokenizer, device).

    lora_cfg.enabled False (and no peft_config): full fine-tuning, the plain model with every
    weight trainable; keep_reference (loss.beta > 0) then keeps a frozen copy of the starting
    weights as the reference policy (`reference_policy`).

    model: None (load model_cfg's: a local folder, a GGUF file or the built-in default, 4-bit when
    asked) or an already loaded transformers causal LM, peft-wrapped (trained as it is) or not.
    An unwrapped model gets fresh LoRA adapters (seeded init) from peft_config (a peft
    LoraConfig) or else lora_cfg (echo says so when the user gave
    no peft_config). The gated MLPs run through grpo_fast.swiglu, the RMSNorms through
    grpo_fast.rms_norm and the LoRA layers through grpo_fast.lean_lora (fewer passes over
    activations, same math).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    from grpo_fast.lean_lora import use_lean_lora
    from grpo_fast.onednn_gemm import use_onednn_linears
    from grpo_fast.rms_norm import use_lean_rms_norm
    from grpo_fast.swiglu import use_lean_swiglu

    full = peft_config is None and not getattr(lora_cfg, "enabled", True)
    if full and model_cfg.load_in_4bit:
        raise ConfigError("lora.enabled: false trains every weight, which a 4-bit base cannot hold; set "
                          "model.load_in_4bit to false (or train LoRA adapters)")
    if model is None:
        device = resolve_device(model_cfg)
        tokenizer = tokenizer or load_tokenizer(model_cfg)
        base = load_base_model(model_cfg, device)
    else:
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_output_embeddings"):
            raise ModelError(f"model: expected a local path or a loaded transformers causal LM, got {type(model).__name__}")
        device = next(model.parameters()).device
        tokenizer = tokenizer or _tokenizer_of(model)
        if isinstance(model, PeftModel):
            if model_cfg.gradient_checkpointing:
                model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
            use_lean_swiglu(model.get_base_model())
            use_lean_rms_norm(model)
            use_lean_lora(model)
            keep_4bit_layout(model)
            return model, tokenizer, device
        base = model
        for p in base.parameters():
            p.requires_grad_(False)
        if peft_config is None and echo is not None and not full:
            echo(f"model: training LoRA adapters (r={lora_cfg.r}, alpha={lora_cfg.lora_alpha}, the lora section); "
                 f"pass peft_config to choose the adapters, or lora.enabled=false to train every weight")
    use_lean_swiglu(base)  # same math; one [T, I] activation per layer fewer kept for the backward
    use_lean_rms_norm(base)  # same math; one pass per row each way on the CPU
    keep_4bit_layout(base)
    if model_cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    if full:
        use_onednn_linears(base)  # fp32 CPU products on oneDNN (MKL runs AVX2 kernels on AMD CPUs)
        return full_finetuning(base, keep_reference), tokenizer, device
    if peft_config is None:
        targets = lora_cfg.target_modules or lora_targets(base)
        peft_config = PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.lora_alpha, lora_dropout=lora_cfg.lora_dropout,
                                     target_modules=targets, task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy = get_peft_model(base, peft_config)
    use_lean_lora(policy)  # same math; the adapter term added inside its GEMM
    return policy, tokenizer, device


def full_finetuning(model, keep_reference: bool):
    """Every weight of `model` trainable; with keep_reference a frozen copy of the starting weights
    rides along (`model._grpo_reference`, in model.parameters() order) for the reference policy."""
    for p in model.parameters():
        p.requires_grad_(True)
    if keep_reference:
        model._grpo_reference = [p.detach().clone() for p in model.parameters()]
    return model


def _tokenizer_of(model):
    """The tokenizer saved beside a loaded model (processing_class when it is not there)."""
    from transformers import AutoTokenizer

    source = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not source or not Path(source).is_dir():
        raise ModelError("processing_class: pass the tokenizer; the model was not loaded from a local folder "
                         "holding one")
    tok = AutoTokenizer.from_pretrained(source)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


class PolicyModules(NamedTuple):
    """The policy as the loss sees it, looked up once per step: the (peft) model, for switching
    its adapters off, its decoder stack (hidden states) and its LM head."""

    model: torch.nn.Module
    decoder: torch.nn.Module
    head: torch.nn.Module


def policy_modules(model) -> PolicyModules:
    from grpo_fast.train import sharding

    decoder, head = decoder_and_head(model)
    if sharding.is_sharded(model):
        decoder = sharding.ShardedDecoder(model, decoder)  # through the root unit (train/sharding.py)
    return PolicyModules(model, decoder, head)


@contextlib.contextmanager
def reference_policy(model):
    """The reference policy: the same modules with LoRA switched off, or (full fine-tuning) with
    the frozen starting weights swapped in for the duration (tensor storages exchanged, no copy).
    A model without either has no reference to switch to (its KL would be 0 by construction):
    ConfigError. Yields the module that computes the reference (a sharded run's frozen copy is
    a module of its own)."""
    from grpo_fast.train import sharding

    sharded_reference = sharding.reference_model(model)
    if sharded_reference is not None:
        yield sharded_reference
        return
    frozen = getattr(model, "_grpo_reference", None)
    if frozen is not None:
        params = list(model.parameters())
        with torch.no_grad():
            for p, r in zip(params, frozen):
                p.data, r.data = r.data, p.data
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, r in zip(params, frozen):
                    p.data, r.data = r.data, p.data
        return
    if not hasattr(model, "disable_adapter") or not getattr(model, "peft_config", None):
        raise ConfigError(f"loss.beta > 0 needs a reference policy, which grpo-fast takes as the model with its LoRA "
                          f"adapters disabled; this {type(model).__name__} has no adapters (so the KL would be 0). "
                          f"Train LoRA adapters, or set beta to 0")
    with model.disable_adapter():
        yield model


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(params, train_cfg, device: torch.device):
    """AdamW: bitsandbytes 8-bit (optionally paged) on CUDA, torch's fp32 AdamW otherwise."""
    optim = train_cfg.optim
    if optim == "auto":
        optim = "adamw_8bit" if device.type == "cuda" else "adamw"
    kwargs = dict(lr=train_cfg.learning_rate, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
                  weight_decay=train_cfg.weight_decay)
    if optim in ("adamw_8bit", "paged_adamw_8bit"):
        if device.type != "cuda":
            raise ConfigError(f"train.optim: {optim} needs CUDA; use adamw on {device.type}")
        import bitsandbytes as bnb

        klass = bnb.optim.PagedAdamW8bit if optim == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return klass(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def build_scheduler(optimizer, train_cfg, total_updates: int):
    """Linear warmup to the peak lr, then cosine or linear decay to 0 at the last update (or constant)."""
    warmup = train_cfg.warmup_steps or int(round(train_cfg.warmup_ratio * total_updates))

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / (warmup + 1)
        if train_cfg.lr_scheduler_type == "constant":
            return 1.0
        progress = min(1.0, (i - warmup) / max(1, total_updates - warmup))
        if train_cfg.lr_scheduler_type == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def save_merged(model_cfg, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Fold the adapter into an unquantized copy of the base and save a plain transformers model.
    Merging into NF4 weights loses precision (trl#3654), so the base is reloaded unquantized."""
    from peft import PeftModel

    device = torch.device("cpu")
    base = load_base_model(model_cfg, device, quantize=False)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out_dir = Path(out_dir)
    merged.save_pretrained(out_dir)
    load_tokenizer(model_cfg).save_pretrained(out_dir)
    return out_dir
