"""Group sampler against Hugging Face: greedy tokens equal to `generate`, log-probs equal to a full
forward over the produced sequences, on tiny random Llama / Qwen2 / Qwen3 / Mistral models (RoPE
scaling variants included) and on a 4-bit + LoRA model; scheduling (fork, preemption, prefix
cache, finish reasons) and seeded reproducibility. CPU, small shapes."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from grpo_fast.models import cpu_ops
from grpo_fast.sampler import Sampler, SamplingParams

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
ROPE = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes gain nothing from threads, and on a shared 2-core box OpenMP barriers of tiny
    ops cost ~10 ms each when other processes hold the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(kind: str, rope: str = "default", seed: int = 0):
    torch.manual_seed(seed)
    extra = {} if ROPE[rope] is None else {"rope_parameters": ROPE[rope]}
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**COMMON, **extra))
    elif kind == "qwen2":  # q/k/v bias
        model = Qwen2ForCausalLM(Qwen2Config(**COMMON, **extra))
    elif kind == "qwen3":  # per-head q/k RMSNorm; head_dim set apart from hidden / heads
        model = Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=32, **extra))
    elif kind == "mistral":  # sliding window larger than every test sequence
        model = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=256, **extra))
    else:
        raise AssertionError(kind)
    return model.eval()


def random_prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def hf_greedy(model, prompt, max_new_tokens):
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def hf_logprobs(model, prompt, completion, temperature=1.0):
    """log softmax(logits / T) of each completion token, from one full forward over prompt + completion."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / temperature  # [C, V]
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None])[:, 0]


def assert_matches_hf(model, sampler, prompts, n, max_tokens):
    outs = sampler.generate(prompts, SamplingParams(n=n, temperature=0.0, max_tokens=max_tokens))
    assert len(outs) == len(prompts)
    for prompt, out in zip(prompts, outs):
        expected = hf_greedy(model, prompt, max_tokens)
        assert len(out.completions) == n
        for comp in out.completions:
            assert comp.token_ids == expected
            assert comp.finish_reason == ("length" if len(expected) == max_tokens else "eos")
            torch.testing.assert_close(torch.tensor(comp.logprobs), hf_logprobs(model, prompt, comp.token_ids),
                                       atol=1e-4, rtol=0)
    assert sampler.stats.generated_tokens == sum(len(c.token_ids) for o in outs for c in o.completions)
    return outs


@pytest.mark.parametrize(
    "kind,rope",
    [("llama", "default"), ("llama", "linear"), ("llama", "llama3"), ("llama", "yarn"),
     ("qwen2", "default"), ("qwen3", "default"), ("mistral", "default")],
)
def test_greedy_and_logprobs_match_hf_tiny(kind, rope):
    model = tiny_model(kind, rope)
    # block_size 4: prompts end mid-block, so the fork shares a partial block (copy-on-write).
    sampler = Sampler(model, None, block_size=4, kv_budget="2048 tokens")
    assert_matches_hf(model, sampler, random_prompts((3, 9, 17)), n=3, max_tokens=10)
    stats = sampler.stats
    assert stats.peak_blocks_saved_by_sharing > 0
    assert stats.preemptions == 0


def test_preemption_keeps_completions_right():
    model = tiny_model("llama", seed=3)
    prompts = random_prompts((6, 7), seed=4)
    # Each sequence needs ceil((7 + 14) / 4) = 6 blocks, the pool has 10: 8 sequences must take turns.
    sampler = Sampler(model, None, block_size=4, kv_budget="40 tokens")
    assert sampler.num_blocks == 10
    assert_matches_hf(model, sampler, prompts, n=4, max_tokens=14)
    assert sampler.stats.preemptions > 0
    assert sampler.stats.peak_blocks_used <= 10


def test_group_shares_prompt_blocks():
    model = tiny_model("llama")
    sampler = Sampler(model, None, block_size=4, kv_budget="512 tokens")
    # 10 prompt tokens = blocks [4, 4, 2]; G = 4. After the first decode step the partial block has
    # been copied on write by every child, the 2 full prompt blocks are still held once:
    # 4 children x 3 blocks = 12 logical, 2 + 4 = 6 physical, so 6 = (G - 1) x 2 saved.
    sampler.generate(random_prompts((10,)), SamplingParams(n=4, temperature=0, max_tokens=2, ignore_eos=True))
    assert sampler.stats.peak_blocks_saved_by_sharing == 6
    assert sampler.stats.peak_blocks_used == 6


def test_budget_in_bytes_and_too_small_budget():
    model = tiny_model("llama")
    # bytes per block = 2 (K,V) * 2 layers * 4 tokens * 2 kv heads * 16 dims * 4 bytes = 2048
    assert Sampler(model, None, block_size=4, kv_budget=2048 * 5).num_blocks == 5
    assert Sampler(model, None, block_size=4, kv_budget="10KiB").num_blocks == 5
    small = Sampler(model, None, block_size=4, kv_budget="16 tokens")
    with pytest.raises(ValueError, match="kv_budget"):
        small.generate(random_prompts((10,)), SamplingParams(n=2, max_tokens=10))
    with pytest.raises(ValueError, match="kv_budget"):
        Sampler(model, None, kv_budget="lots")


def test_prefix_cache_shares_a_common_head():
    model = tiny_model("qwen2")
    head = random_prompts((12,), seed=5)[0]  # 3 full blocks of 4, shared by both prompts
    prompts = [head + [5, 6, 7], head + [9, 10]]
    sampler = Sampler(model, None, block_size=4, kv_budget="2048 tokens")
    assert_matches_hf(model, sampler, prompts, n=2, max_tokens=6)
    # The second prompt recomputed only its 2 own tokens.
    assert sampler.stats.prefill_tokens == len(prompts[0]) + 2


def test_seeded_sampling_reproducible_and_logprobs_tempered():
    model = tiny_model("qwen3")
    prompts = random_prompts((5, 11))
    sampler = Sampler(model, None, block_size=4, kv_budget="2048 tokens")
    params = SamplingParams(n=4, temperature=0.8, top_k=40, top_p=0.95, max_tokens=12, seed=7)
    first = sampler.generate(prompts, params)
    again = sampler.generate(prompts, params)
    other = sampler.generate(prompts, SamplingParams(**{**params.__dict__, "seed": 8}))
    tokens = lambda outs: [[c.token_ids for c in o.completions] for o in outs]  # noqa: E731
    assert tokens(first) == tokens(again)
    assert tokens(first) != tokens(other)
    for prompt, out in zip(prompts, first):
        assert len({tuple(c.token_ids) for c in out.completions}) > 1  # children draw independently
        for comp in out.completions:
            # Logprob under the temperature-scaled full distribution (before top-k / top-p).
            torch.testing.assert_close(torch.tensor(comp.logprobs),
                                       hf_logprobs(model, prompt, comp.token_ids, temperature=0.8),
                                       atol=1e-4, rtol=0)


def test_released_kv_cache_is_freed_and_reallocated_on_the_next_call():
    """A trainer frees the cache between sampling phases; the next call must sample exactly what
    it would have with the cache kept (the cache carries nothing between calls)."""
    model = tiny_model("llama")
    prompts = random_prompts((6, 9))
    sampler = Sampler(model, None, block_size=4, kv_budget="1024 tokens")
    params = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=11)
    kept = sampler.generate(prompts, params)
    sampler.release_kv_cache()
    assert sampler.runner._kv_cache is None
    assert sampler.stats.kv_bytes == sampler.runner.kv_bytes > 0  # the budget is still known
    again = sampler.generate(prompts, params)
    assert sampler.runner._kv_cache is not None
    tokens = lambda outs: [[(c.token_ids, c.logprobs) for c in o.completions] for o in outs]  # noqa: E731
    assert tokens(again) == tokens(kept)


class CharTokenizer:
    """token i decodes to one letter: enough to test stop strings without a real tokenizer."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_finish_reasons_eos_stop_token_stop_string_length():
    model = tiny_model("llama", seed=5)
    model.generation_config.eos_token_id = None
    tok = CharTokenizer()
    prompt = random_prompts((6,), seed=6)
    sampler = Sampler(model, tok, block_size=4, kv_budget="512 tokens")
    base = sampler.generate(prompt, SamplingParams(n=1, temperature=0, max_tokens=12))[0].completions[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 12
    target = base.token_ids[5]
    cut = base.token_ids.index(target) + 1

    stopped = sampler.generate(prompt, SamplingParams(n=2, temperature=0, max_tokens=12, stop_token_ids=[target]))
    for comp in stopped[0].completions:
        assert comp.token_ids == base.token_ids[:cut] and comp.finish_reason == "stop"

    text = tok.decode(base.token_ids)
    stop = text[6:8]
    end = next(j for j in range(len(text)) if stop in text[: j + 1]) + 1
    by_string = sampler.generate(prompt, SamplingParams(n=1, temperature=0, max_tokens=12, stop=stop))
    comp = by_string[0].completions[0]
    assert comp.token_ids == base.token_ids[:end] and comp.finish_reason == "stop"

    model.generation_config.eos_token_id = target
    eos_sampler = Sampler(model, tok, block_size=4, kv_budget="512 tokens")
    comp = eos_sampler.generate(prompt, SamplingParams(n=1, temperature=0, max_tokens=12))[0].completions[0]
    assert comp.token_ids == base.token_ids[:cut] and comp.finish_reason == "eos"
    ignored = eos_sampler.generate(prompt, SamplingParams(n=1, temperature=0, max_tokens=12, ignore_eos=True))
    assert ignored[0].completions[0].token_ids == base.token_ids


def test_unsupported_architecture_is_named():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        Sampler(model, None)


def test_params_validation():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="n must"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    model = tiny_model("llama")
    sampler = Sampler(model, None, block_size=4, kv_budget="512 tokens")
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\]"):
        sampler.generate([[1, 2], [VOCAB + 5]], SamplingParams())
    with pytest.raises(ValueError, match="tokenizer"):
        sampler.generate([[1, 2]], SamplingParams(stop=["x"]))


def test_training_mode_restored():
    model = tiny_model("llama").train()
    Sampler(model, None, block_size=4, kv_budget="512 tokens").generate([[4, 5, 6]], SamplingParams(max_tokens=2))
    assert all(m.training for m in model.modules())


# Decode fast paths (grpo_fast.models.decode_fast_paths), each case run on the path it names:
# 5 rows -> MKL's transposed product; 37 rows -> the native kernel (or, with it switched off,
# the transposed product again).
_NATIVE = pytest.mark.skipif(not cpu_ops.available(), reason="native CPU linear needs AVX2+FMA and the _C build")
FAST_PATHS = [pytest.param((5, False), id="transposed"), pytest.param((37, False), id="native", marks=_NATIVE),
              pytest.param((37, True), id="transposed-37rows")]


@pytest.fixture
def fast_path(request, monkeypatch):
    rows, native_off = request.param
    if native_off:
        monkeypatch.setenv("GRPO_FAST_NO_CPU_LINEAR", "1")
    return rows


@pytest.mark.parametrize("fast_path", FAST_PATHS, indirect=True)
def test_plain_linear_fast_path_is_the_module_math(fast_path):
    from torch import nn

    from grpo_fast.models.decode_fast_paths import FastPaths

    fast = FastPaths()
    linear, linear_add_ = fast.linear, fast.linear_add_
    lin = nn.Linear(64, 96, bias=True)
    x = torch.randn(fast_path, 64)
    torch.testing.assert_close(linear(lin, x), lin(x), atol=1e-5, rtol=1e-5)
    into = torch.randn(fast_path, 96)
    torch.testing.assert_close(linear_add_(into.clone(), lin, x), into + lin(x), atol=1e-5, rtol=1e-5)
    calls = []
    lin.register_forward_hook(lambda mod, inp, out: calls.append(1))
    linear(lin, x)
    assert calls == [1]  # a hooked layer is called as a module


@pytest.mark.parametrize("fast_path", FAST_PATHS, indirect=True)
def test_peft_lora_fast_path_is_the_module_math(fast_path):
    """The decode fast path over a peft LoRA layer (base W x plus s * B (A x)) equals peft's own
    forward, follows a disabled adapter, and reads the live LoRA weights."""
    from peft import LoraConfig, get_peft_model

    from grpo_fast.models.decode_fast_paths import FastPaths, lora_terms

    fast = FastPaths()
    linear, linear_add_ = fast.linear, fast.linear_add_

    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=12, init_lora_weights=False,
                                                         target_modules=["q_proj", "down_proj"])).eval()
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert lora_terms(q_proj) is not None  # the fast path is taken, not the module fallback
    x = torch.randn(fast_path, 64)
    torch.testing.assert_close(linear(q_proj, x), q_proj(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        q_proj.lora_B["default"].weight.mul_(3.0)  # the live adapter, not a snapshot
    torch.testing.assert_close(linear(q_proj, x), q_proj(x), atol=1e-5, rtol=1e-5)
    into = torch.randn(fast_path, 64)
    torch.testing.assert_close(linear_add_(into.clone(), q_proj, x), into + q_proj(x), atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(linear(q_proj, x), q_proj.base_layer(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(q_proj(x), q_proj.base_layer(x), atol=1e-3)
    # Greedy completions and log-probs still equal HF's over the whole peft model.
    sampler = Sampler(model, None, block_size=4, kv_budget="1024 tokens")
    assert_matches_hf(model, sampler, random_prompts((5, 9)), n=2, max_tokens=6)


@pytest.mark.parametrize("fast_path", FAST_PATHS, indirect=True)
def test_gated_mlp_and_lm_head_fast_paths_are_the_module_math(fast_path):
    """The decode fast paths that reorganize work (the MLP fused or run transposed, the LM head
    made a vocabulary chunk at a time) give the modules' own outputs, LoRA and bias included."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from grpo_fast.models.decode_fast_paths import FastPaths

    fast = FastPaths()
    gated_mlp_add_, lm_head = fast.gated_mlp_add_, fast.lm_head

    torch.manual_seed(0)
    head = nn.Linear(64, 1031, bias=True)  # vocab not a multiple of the chunk
    x = torch.randn(fast_path, 64)
    torch.testing.assert_close(lm_head(head, x, rows_per_chunk=100), head(x), atol=1e-5, rtol=1e-5)
    into = torch.randn(fast_path, 64)
    biased = LlamaForCausalLM(LlamaConfig(**COMMON, mlp_bias=True)).model.layers[0].mlp
    model = tiny_model("llama")
    for mlp in (model.model.layers[0].mlp, biased):
        torch.testing.assert_close(gated_mlp_add_(into.clone(), mlp, x), into + mlp(x), atol=1e-5, rtol=1e-5)
    mlp = model.model.layers[0].mlp
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                  target_modules=["gate_proj", "up_proj", "down_proj"])).eval()
    lora_mlp = peft_model.base_model.model.model.layers[0].mlp
    torch.testing.assert_close(gated_mlp_add_(into.clone(), lora_mlp, x), into + lora_mlp(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(lora_mlp(x), mlp.down_proj.base_layer(
        mlp.act_fn(mlp.gate_proj.base_layer(x)) * mlp.up_proj.base_layer(x)), atol=1e-4)


def test_fast_path_scope_remembers_paths_for_one_call_only():
    """FastPaths.scope: inside, a module's path facts are computed once (the memo holds it) and
    outputs still equal the module's; the memo ends with the scope, so an adapter disabled
    between two generate calls is seen by the second. Each FastPaths owns its memo."""
    from peft import LoraConfig, get_peft_model

    from grpo_fast.models.decode_fast_paths import FastPaths

    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=12, init_lora_weights=False,
                                                         target_modules=["q_proj"])).eval()
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(37, 64)
    fast, other = FastPaths(), FastPaths()
    with fast.scope():
        torch.testing.assert_close(fast.linear(q_proj, x), q_proj(x), atol=1e-5, rtol=1e-5)
        assert fast._memo[(id(q_proj), "parts")][1].terms  # remembered, with its adapter
        assert other._memo is None  # not shared between owners
        with fast.scope():  # nested scopes restore the outer memo
            assert fast._memo == {}
        assert (id(q_proj), "parts") in fast._memo
    assert fast._memo is None
    with model.disable_adapter(), fast.scope():
        torch.testing.assert_close(fast.linear(q_proj, x), q_proj.base_layer(x), atol=1e-5, rtol=1e-5)
    prompts = random_prompts((5, 9))
    sampler = Sampler(model, None, block_size=4, kv_budget="1024 tokens")
    with torch.no_grad():
        want = sampler.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0))
        with model.disable_adapter():
            off = sampler.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0))
        again = sampler.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0))
    assert [c.logprobs for o in want for c in o.completions] == [c.logprobs for o in again for c in o.completions]
    assert [c.logprobs for o in want for c in o.completions] != [c.logprobs for o in off for c in o.completions]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_native_decode_layers_equal_hf_and_the_module_path(kind, monkeypatch):
    """Decode steps of >= 8 sequences on a plain fp32 model run each layer as one native call
    (models/native_decode.py): greedy tokens and log-probs equal HF's, and equal the per-module
    path (GRPO_FAST_NO_NATIVE_LAYER=1) to fp32 rounding."""
    from grpo_fast.models import native_decode

    calls = []
    real = native_decode.decode_forward
    monkeypatch.setattr(native_decode, "decode_forward", lambda *a: calls.append(1) or real(*a))
    model = tiny_model(kind)
    sampler = Sampler(model, None, block_size=4, kv_budget="2048 tokens")
    prompts = random_prompts((3, 9, 17))
    native = assert_matches_hf(model, sampler, prompts, n=4, max_tokens=8)  # 12 sequences
    assert calls, "the native layer path was not taken"
    monkeypatch.setenv("GRPO_FAST_NO_NATIVE_LAYER", "1")
    taken = len(calls)
    modules = sampler.generate(prompts, SamplingParams(n=4, temperature=0.0, max_tokens=8))
    assert len(calls) == taken
    for a, b in zip(native, modules):
        for ca, cb in zip(a.completions, b.completions):
            assert ca.token_ids == cb.token_ids
            torch.testing.assert_close(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=1e-5, rtol=0)


def test_native_decode_layers_only_for_fp32_models_it_computes_exactly():
    """Plain and LoRA-wrapped fp32 models take the native stack (LoRA: tests/test_native_lora.py);
    Qwen3 (per-head q/k norms) and bf16 models keep the per-module path."""
    from peft import LoraConfig, get_peft_model

    from grpo_fast.models.llama_family import LlamaFamily
    from grpo_fast.models.native_decode import native_layers

    assert native_layers(LlamaFamily(tiny_model("llama"))) is not None
    assert native_layers(LlamaFamily(tiny_model("qwen3"))) is None
    lora = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["v_proj"]))
    assert native_layers(LlamaFamily(lora)).num_adapters == 2
    assert native_layers(LlamaFamily(tiny_model("llama").to(torch.bfloat16))) is None


def test_a_share_of_the_batch_samples_what_the_whole_batch_would():
    """Data parallel: a rank samples prompts [2, 4) of the step with first_group=2 and gets the
    very completions one process sampling all four gets for them (seeds follow the global index)."""
    model = tiny_model("llama", seed=2)
    prompts = random_prompts((5, 8, 6, 9), seed=3)
    sampler = Sampler(model, None, block_size=4, kv_budget="1024 tokens")
    params = dict(n=3, temperature=1.0, max_tokens=12, seed=11, ignore_eos=True)
    whole = sampler.generate(prompts, SamplingParams(**params))
    share = sampler.generate(prompts[2:], SamplingParams(**params, first_group=2))
    for w, s in zip(whole[2:], share):
        assert [c.token_ids for c in s.completions] == [c.token_ids for c in w.completions]
    unshifted = sampler.generate(prompts[2:], SamplingParams(**params))
    assert [c.token_ids for c in unshifted[0].completions] != [c.token_ids for c in whole[2].completions]
