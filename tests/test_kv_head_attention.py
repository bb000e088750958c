"""Attention on the K/V heads where completions attend over a cached prompt, on the CPU
(grpo_fast.train.kv_head_attention): the same hidden states and LoRA gradients as HF's repeated
K/V, with autograd saving exactly the repeat's share less (and the packed layout untouched);
restored on exit, and off under gradient checkpointing."""

import contextlib

import pytest
import torch

from grpo_fast.train import packed_forward as pf
from grpo_fast.train.kv_head_attention import _sdpa_module, kv_head_attention
from grpo_fast.train.rollout_batch import make_batch
from test_loss_training import policy_with_lora
from test_train_loop import make_tiny_model

Q_HEADS, KV_HEADS, HEAD_DIM, LAYERS = 4, 2, 8, 2  # make_tiny_model's Llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_kv_heads"))


def one_group(tok, P=9, C=6, G=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt = [int(t) for t in torch.randint(2, 60, (P,), generator=g)]
    comps = [[int(t) for t in torch.randint(2, 60, (C,), generator=g)] for _ in range(G)]
    return make_batch([prompt] * G, comps, tok.pad_token_id)


def run(decoder, batch, layout, params):
    """Hidden states, the LoRA gradients of a fixed projection of them, and the bytes autograd saved
    (parameters aside)."""
    own = {p.untyped_storage().data_ptr() for p in decoder.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = pf.completion_hidden(decoder, batch, layout=layout)  # [N, C, H]
    weights = torch.linspace(-1, 1, hidden.numel()).reshape(hidden.shape)
    grads = torch.autograd.grad((hidden * weights).sum(), params)
    return hidden.detach(), grads, sum(saved.values())


@pytest.mark.parametrize("layout", ["packed", "cached"])
def test_same_hidden_and_gradients_with_the_repeat_saved_less(tiny, layout, monkeypatch):
    from grpo_fast.train.model import policy_modules, trainable_parameters

    assert _sdpa_module() is not None, "this transformers has no use_gqa_in_sdpa to answer"
    monkeypatch.setenv("GRPO_FAST_NO_CPU_TRAIN_ATTENTION", "1")  # SDPA (the native op never repeats K/V)
    model, tok = policy_with_lora(tiny)
    model.train()
    decoder = policy_modules(model).decoder
    params = trainable_parameters(model)
    P, C, G = 9, 6, 4
    batch = one_group(tok, P, C, G)
    hidden, grads, saved = run(decoder, batch, layout, params)
    monkeypatch.setattr(pf, "kv_head_attention", lambda enabled=True: contextlib.nullcontext(False))
    want_hidden, want_grads, repeated = run(decoder, batch, layout, params)
    torch.testing.assert_close(hidden, want_hidden, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # cached: K and V reach the completions' SDPA at 2 heads instead of 4 in every layer, over
    # each row's prompt + its completion (P + C - 1 keys); the prompt pass, unmasked, took its K/V
    # heads already. packed: left to HF (one long masked sequence runs slower on the K/V heads)
    keys = 0 if layout == "packed" else G * (P + C - 1)
    assert repeated - saved == LAYERS * keys * 2 * (Q_HEADS - KV_HEADS) * HEAD_DIM * 4


def test_the_hook_is_restored_nests_and_is_off_when_asked():
    module = _sdpa_module()
    original = module.use_gqa_in_sdpa
    key = torch.zeros(1, 2, 3, 8)
    mask = torch.zeros(1, 1, 3, 3)
    with kv_head_attention() as on:
        assert on and module.use_gqa_in_sdpa(mask, key, key)  # CPU, masked: K/V heads
        with kv_head_attention(enabled=False) as inner:
            assert not inner
        with kv_head_attention():
            pass
        assert module.use_gqa_in_sdpa is not original  # the inner exits restored the outer's
        meta = torch.zeros(1, 2, 3, 8, device="meta")
        assert module.use_gqa_in_sdpa(mask, meta, meta) == original(mask, meta, meta)  # other devices: as HF says
    assert module.use_gqa_in_sdpa is original
    with pytest.raises(RuntimeError), kv_head_attention():
        raise RuntimeError("a failing forward")
    assert module.use_gqa_in_sdpa is original


def test_off_under_gradient_checkpointing(tiny, monkeypatch):
    """Its recompute runs in the backward, outside the context: the forward must save what the
    recompute will. Completions over a prefix ask for it off when the decoder is checkpointed
    (HF drops caches there, so the training pass never takes this path checkpointed; this holds
    the guard anyway)."""
    from grpo_fast.train.model import policy_modules

    model, tok = policy_with_lora(tiny)
    model.train()
    decoder = policy_modules(model).decoder
    batch = one_group(tok)
    prefix = pf.run_prompts(decoder, batch, torch.tensor([0])).map(lambda t: t.expand(len(batch), *t.shape[1:]))
    asked = []
    real = pf.kv_head_attention
    monkeypatch.setattr(pf, "kv_head_attention", lambda enabled=True: (asked.append(enabled), real(enabled))[1])
    pf.completions_over_prefix(decoder, batch, prefix)
    monkeypatch.setattr(pf, "is_checkpointed", lambda d: True)
    pf.completions_over_prefix(decoder, batch, prefix)
    assert asked == [True, False]
