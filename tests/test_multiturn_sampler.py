"""Multi-turn sampling on the paged sampler: environment tokens appended to live sequences are
prefilled once against the sequence's own KV (shared and copied blocks alike) and decoding
resumes; the result equals a fresh prefill of the whole sequence and an HF `generate` loop that
re-prefills the conversation every turn. Tiny random models, CPU."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from grpo_fast import kv
from grpo_fast.sampler import Sampler, SamplingParams
from grpo_fast.sampler.model_runner import ModelRunner
from test_sampler import VOCAB, hf_logprobs, random_prompts, tiny_model

STOPS = tuple(range(3, VOCAB, 3))  # a third of the vocabulary ends a turn: turns of a few tokens
EOS = 2  # LlamaConfig's default


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ScriptedEnvironment:
    """Answers turn k of every trajectory with replies[k] (fixed tokens); None after the last."""

    def __init__(self, replies):
        self.replies = replies
        self.calls = []
        self.lock = threading.Lock()

    def __call__(self, turn):
        with self.lock:
            self.calls.append(turn)
        k = turn.num_turns - 1
        return list(self.replies[k]) if k < len(self.replies) else None


REPLIES = ([11, 12, 13], [21, 22, 23, 24, 25], [31, 32])  # 3 observations: 3, 5, 2 tokens


@torch.no_grad()
def hf_reprefill_loop(model, prompt, replies, max_tokens):
    """The peer: every turn HF `generate` re-runs the whole conversation (prompt + all turns)."""
    completion, mask = [], []
    for k in range(len(replies) + 1):
        ids = torch.tensor([prompt + completion], device=model.device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_tokens - len(completion), eos_token_id=[EOS, *STOPS],
                             pad_token_id=0)
        turn = out[0, ids.shape[1]:].tolist()
        completion += turn
        mask += [1] * len(turn)
        ended = turn[-1] in STOPS or turn[-1] == EOS
        if not ended or len(completion) >= max_tokens or k == len(replies):
            return completion, mask
        if len(completion) + len(replies[k]) >= max_tokens:
            return completion, mask
        completion += replies[k]
        mask += [0] * len(replies[k])
    return completion, mask


@pytest.mark.parametrize("kind,device", [("llama", "cpu"), ("qwen3", "cpu"),
                                         pytest.param("llama", "cuda", marks=pytest.mark.gpu)])
def test_greedy_multiturn_equals_hf_reprefill_loop(kind, device):
    model = tiny_model(kind, seed=7).to(device)
    prompts = random_prompts((5, 9), seed=8)
    env = ScriptedEnvironment(REPLIES)
    sampler = Sampler(model, None, block_size=4, kv_budget="1024 tokens")
    params = SamplingParams(n=2, temperature=0.0, max_tokens=40, stop_token_ids=STOPS)
    outs = sampler.generate(prompts, params, turn_handler=env)
    env_tokens = 0
    for prompt, out in zip(prompts, outs):
        expected, expected_mask = hf_reprefill_loop(model, prompt, REPLIES, 40)
        for comp in out.completions:
            assert comp.token_ids == expected
            assert comp.model_mask == expected_mask
            env_tokens += comp.model_mask.count(0)
            sampled = [i for i, m in enumerate(comp.model_mask) if m]
            # next-token log-probs after every appended observation = a full forward's
            full = hf_logprobs(model.cpu(), prompt, comp.token_ids)
            model.to(device)
            torch.testing.assert_close(torch.tensor(comp.logprobs)[sampled], full[sampled], atol=1e-4, rtol=0)
            assert all(comp.logprobs[i] == 0.0 for i, m in enumerate(comp.model_mask) if not m)
    assert env_tokens > 0, "the script never ran: no turn ended on a stop token"
    stats = sampler.stats
    # each prompt computed once, each observation once: nothing of the conversation again
    assert stats.environment_tokens == env_tokens
    assert stats.prefill_tokens == sum(len(p) for p in prompts) + env_tokens
    assert stats.preemptions == 0


def test_scripted_environment_three_turns_with_known_counts():
    model = tiny_model("llama", seed=7)
    prompts = random_prompts((6,), seed=9)
    env = ScriptedEnvironment(REPLIES)
    sampler = Sampler(model, None, block_size=4, kv_budget="1024 tokens")
    # ignore_eos and a huge budget: every turn ends on a stop token, so all 3 replies are used
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=200, stop_token_ids=STOPS, ignore_eos=True)
    (out,) = sampler.generate(prompts, params, turn_handler=env)
    for comp in out.completions:
        segments = comp.segments()
        sources = [s for _, s in segments]
        assert sources == ["model", "environment"] * 3 + ["model"]
        assert [toks for toks, s in segments if s == "environment"] == [list(r) for r in REPLIES]
        assert comp.num_turns == 4
        assert comp.token_ids[-1] in STOPS and comp.finish_reason == "stop"
        for toks, s in segments:
            if s == "model":
                assert toks[-1] in STOPS and not any(t in STOPS for t in toks[:-1])  # a turn ends at its stop
    assert len(env.calls) == 3 * 4  # 4 turn ends per trajectory, the last answered None
    assert [c.num_turns for c in env.calls if c.child_idx == 0] == [1, 2, 3, 4]
    first = next(c for c in env.calls if c.child_idx == 0 and c.num_turns == 2)
    assert first.turn_token_ids == first.completion_token_ids[len(out.completions[0].segments()[0][0]) + 3:]
    assert sampler.stats.prefill_tokens == 6 + 3 * 10


def test_blocking_environment_runs_while_others_decode_and_futures_resolve():
    """Futures: a slow environment holds its sequence's blocks while the others keep decoding."""
    model = tiny_model("llama", seed=7)
    prompts = random_prompts((5, 7), seed=10)
    pool = ThreadPoolExecutor(4)
    env = ScriptedEnvironment(REPLIES)
    sampler = Sampler(model, None, block_size=4, kv_budget="1024 tokens")
    params = SamplingParams(n=2, temperature=0.0, max_tokens=40, stop_token_ids=STOPS)
    sync = sampler.generate(prompts, params, turn_handler=env)
    slow = sampler.generate(prompts, params, turn_handler=lambda t: pool.submit(env, t))
    pool.shutdown()
    assert [[c.token_ids for c in o.completions] for o in slow] == [[c.token_ids for c in o.completions] for o in sync]


def test_budget_overrun_ends_with_length_and_handler_errors_are_named():
    model = tiny_model("llama", seed=7)
    prompts = random_prompts((5,), seed=8)
    sampler = Sampler(model, None, block_size=4, kv_budget="1024 tokens")
    params = SamplingParams(n=1, temperature=0.0, max_tokens=12, stop_token_ids=STOPS, ignore_eos=True)
    (out,) = sampler.generate(prompts, params, turn_handler=lambda t: [9] * 30)  # never fits
    comp = out.completions[0]
    assert comp.finish_reason == "length" and comp.model_mask == [1] * len(comp.token_ids)
    with pytest.raises(RuntimeError, match="turn_handler failed for prompt 0, completion 0: KeyError"):
        sampler.generate(prompts, params, turn_handler=lambda t: {}["x"])
    with pytest.raises(ValueError, match="expected None or a list of token ids"):
        sampler.generate(prompts, params, turn_handler=lambda t: "text")
    with pytest.raises(ValueError, match=r"not ints in \[0, 128\)"):
        sampler.generate(prompts, params, turn_handler=lambda t: [VOCAB + 1])


def test_preempted_multiturn_sequences_are_recomputed_from_all_their_tokens():
    model = tiny_model("llama", seed=7)
    prompts = random_prompts((6, 7), seed=11)
    params = SamplingParams(n=4, temperature=0.0, max_tokens=30, stop_token_ids=STOPS)
    roomy = Sampler(model, None, block_size=4, kv_budget="1024 tokens")
    expected = roomy.generate(prompts, params, turn_handler=ScriptedEnvironment(REPLIES))
    tight = Sampler(model, None, block_size=4, kv_budget="48 tokens")  # 12 blocks for 8 sequences
    got = tight.generate(prompts, params, turn_handler=ScriptedEnvironment(REPLIES))
    assert tight.stats.preemptions > 0
    for e, g in zip(expected, got):
        assert [c.token_ids for c in g.completions] == [c.token_ids for c in e.completions]
        assert [c.model_mask for c in g.completions] == [c.model_mask for c in e.completions]
        for ce, cg in zip(e.completions, g.completions):
            torch.testing.assert_close(torch.tensor(cg.logprobs), torch.tensor(ce.logprobs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_appended_kv_equals_a_fresh_prefill_of_the_whole_sequence(dtype):
    """Runner level: prompt prefilled once, forked into 2 children (the partial last block shared),
    child 0 gets 7 more tokens appended (copy-on-write, then across a block boundary) and only
    those prefilled. Its K/V and next-token logits equal a fresh prefill of prompt + appended
    tokens; child 1's (shared) blocks are untouched."""
    model = tiny_model("llama", seed=12).to(dtype)
    bs = 4
    runner = ModelRunner(model, num_blocks=64, block_size=bs)
    prompt, extra = random_prompts((10, 7), seed=13)
    with torch.inference_mode(), runner.generate_call():
        pool = kv.BlockManager(64, block_size=bs, enable_prefix_cache=False)
        pool.allocate(0, prompt)
        runner.prefill(pool, [(0, prompt, 0)])
        pool.fork(0, [1, 2])
        pool.free(0)
        sibling_before = kv.gather_kv(*runner._caches(0), pool.slot_mapping(2, 0, 10).to(torch.int32))
        sibling_before = [t.clone() for t in sibling_before]
        full = prompt + extra
        copies = []
        for _ in extra:
            copies += pool.append_token(1)
        assert copies, "the shared partial block must be copied on write"
        runner.copy_blocks(copies)
        logits = runner.prefill(pool, [(1, full, len(prompt))])  # only the 7 new tokens computed

        fresh = kv.BlockManager(64, block_size=bs, enable_prefix_cache=False)
        fresh_runner = ModelRunner(model, num_blocks=64, block_size=bs)
        fresh.allocate(9, full)
        expected_logits = fresh_runner.prefill(fresh, [(9, full, 0)])
        tol = dict(atol=1e-5, rtol=0) if dtype == torch.float32 else dict(atol=2e-2, rtol=0)
        torch.testing.assert_close(logits, expected_logits, **tol)
        for layer in range(model.config.num_hidden_layers):
            got = kv.gather_kv(*runner._caches(layer), pool.slot_mapping(1, 0, len(full)).to(torch.int32))
            want = kv.gather_kv(*fresh_runner._caches(layer), fresh.slot_mapping(9, 0, len(full)).to(torch.int32))
            for g, w in zip(got, want):
                torch.testing.assert_close(g.float(), w.float(), **tol)
        sibling_after = kv.gather_kv(*runner._caches(0), pool.slot_mapping(2, 0, 10).to(torch.int32))
        for b, a in zip(sibling_before, sibling_after):
            assert torch.equal(b, a)
