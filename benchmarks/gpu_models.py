"""Models for the GPU check, built from a config alone: no download, no hub, no GGUF.

    qwen2.5-1.5b-random  Qwen2.5-1.5B's shapes (hidden 1536, 28 layers, 12 heads / 2 KV heads,
                         MLP 8960, vocab 151,936, tied embeddings), random weights
    tiny-random          the same architecture at toy size: the CPU rehearsal of the same code

Random weights make every completion run to its length cap (EOS is 1 token in 151,936), which is
what a throughput benchmark wants. The tokenizer is character level (printable ASCII, built with
`tokenizers` in code) padded with filler tokens `<t123>` up to the model's vocab, so every id the
model samples decodes to text, and it carries a chat template, so the sampler benchmark and the
training loop run on it exactly as on a real model.
"""
from __future__ import annotations

import shutil
import string
from pathlib import Path

import torch

PRESETS = {
    "qwen2.5-1.5b-random": dict(vocab_size=151_936, hidden_size=1536, intermediate_size=8960,
                                num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2),
    "tiny-random": dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}
SPECIALS = ["<pad>", "<|im_end|>"]  # ids 0 and 1: pad and EOS
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def qwen2_config(preset: str):
    from transformers import Qwen2Config

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    return Qwen2Config(**PRESETS[preset], max_position_embeddings=32_768, tie_word_embeddings=True,
                       rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=None)


def make_tokenizer(vocab_size: int):
    """Character-level fast tokenizer with `vocab_size` entries and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    tokens = SPECIALS + chars
    if vocab_size < len(tokens):
        raise ValueError(f"vocab_size must be >= {len(tokens)}, got {vocab_size}")
    tokens += [f"<t{i}>" for i in range(len(tokens), vocab_size)]  # decodable filler ids
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="?"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=SPECIALS[1], pad_token=SPECIALS[0])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(preset: str = "qwen2.5-1.5b-random", *, device="cpu", dtype=torch.bfloat16, seed: int = 0):
    """A random-initialized Qwen2ForCausalLM, created directly on `device` in `dtype` (a 1.5B
    model initialized on the GPU takes a second; in fp32 on the CPU it would take a minute)."""
    from transformers import Qwen2ForCausalLM

    config = qwen2_config(preset)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def build_model_and_tokenizer(preset: str = "qwen2.5-1.5b-random", *, device="cpu", dtype=torch.bfloat16,
                              seed: int = 0):
    model = build_model(preset, device=device, dtype=dtype, seed=seed)
    return model, make_tokenizer(model.config.vocab_size)


def save_model_folder(path: str | Path, preset: str = "qwen2.5-1.5b-random", *, device="cpu",
                      dtype=torch.bfloat16, seed: int = 0) -> Path:
    """Write config + safetensors + tokenizer to `path` (an HF folder the training loop loads),
    unless a complete one is already there. Written to a sibling temp folder and renamed, so an
    interrupted write never leaves a half folder that a later stage would trust."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file() and any(path.glob("*.safetensors")):
        return path
    tmp = path.with_name(path.name + ".partial")
    for stale in (tmp, path):  # a half-written folder from an interrupted run
        if stale.exists():
            shutil.rmtree(stale)
    model, tok = build_model_and_tokenizer(preset, device=device, dtype=dtype, seed=seed)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del model
    tmp.replace(path)
    return path


def token_parity(prompts, completions, completion_ids, **_):
    """A reward a random-weight model earns half the time (first token id even), so groups have
    spread and the step's advantages, loss and gradients are not all zero."""
    return [float(len(ids) > 0 and ids[0] % 2 == 0) for ids in completion_ids]
