"""CUDA graphs for the sampler's decode step (grpo_fast/sampler/decode_graphs.py).

On the CPU: the bucket choice, the argument checks, and the padding a replay relies on (rows with
slot -1 and context length 0 leave the real rows' logits and the cache untouched). On CUDA
(`gpu`, skipped elsewhere): replayed steps give the eager sampler's tokens and log-probs.
"""

from __future__ import annotations

import pytest
import torch

from grpo_fast import kv
from grpo_fast.sampler import Sampler, SamplingParams
from grpo_fast.sampler.decode_graphs import bucket_for
from test_sampler import random_prompts, tiny_model


def test_bucket_for():
    assert [bucket_for(n) for n in (1, 2, 3, 5, 8, 9, 16, 17, 33, 512)] == [1, 2, 4, 8, 8, 16, 16, 32, 48, 512]
    assert bucket_for(513) is None  # run eagerly


def test_cuda_graphs_argument_is_checked():
    with pytest.raises(ValueError, match="cuda_graphs=True needs a model on a CUDA device"):
        Sampler(tiny_model("llama"), None, kv_budget="256 tokens", cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs must be a bool"):
        Sampler(tiny_model("llama"), None, kv_budget="256 tokens", cuda_graphs="yes")


@pytest.mark.parametrize("kind", ["llama", "qwen3"])  # native layer path, per-module path
def test_padding_rows_leave_real_rows_alone(kind):
    """decode_forward with padding rows (slot -1, context 0), as a replayed bucket runs it: the
    padding writes nothing (every cache row but the real rows' new slots is bitwise as before),
    and the real rows' logits and new K/V equal the unpadded step's to fp32 rounding (torch's
    elementwise ops, e.g. the rotary module's cos/sin, may round a row differently in a batch
    of 16 than of 9)."""
    model = tiny_model(kind)
    sampler = Sampler(model, None, block_size=4, kv_budget="1024 tokens")
    runner = sampler.runner
    prompts = random_prompts((5, 9, 6))
    bm = kv.BlockManager(runner.num_blocks, block_size=4)
    with torch.inference_mode():
        ids = []
        for i, p in enumerate(prompts * 3):  # 9 sequences: the native layer path on llama
            cached = bm.allocate(i, p)
            ids.append(i)
            runner.prefill(bm, [(i, p, cached)])
        for i in ids:
            runner.copy_blocks(bm.append_token(i))
        slots, tables, lens = bm.decode_metadata(ids)
        args = [torch.tensor([7] * 9), torch.as_tensor(slots).int(), torch.as_tensor(tables).int(),
                torch.as_tensor(lens).int()]
        cache = runner.kv_cache.clone()
        want = runner.decode_forward(*args)
        after = runner.kv_cache.clone()
        runner.kv_cache.copy_(cache)
        pad = 7
        padded = [torch.cat([args[0], torch.zeros(pad, dtype=torch.int64)]),
                  torch.cat([args[1], torch.full((pad,), -1, dtype=torch.int32)]),
                  torch.cat([args[2], torch.zeros(pad, args[2].shape[1], dtype=torch.int32)]),
                  torch.cat([args[3], torch.zeros(pad, dtype=torch.int32)])]
        got = runner.decode_forward(*padded)
    torch.testing.assert_close(got[:9], want, atol=1e-5, rtol=1e-5)
    rows = runner.kv_cache.flatten(2, 3)  # [L, 2, num_slots, Hkv, D]
    new = args[1].long()
    untouched = torch.ones(rows.shape[2], dtype=torch.bool)
    untouched[new] = False
    # Bit patterns, not values: slots never written hold whatever torch.empty gave, NaN included.
    assert torch.equal(rows[:, :, untouched].view(torch.int32), cache.flatten(2, 3)[:, :, untouched].view(torch.int32))
    torch.testing.assert_close(rows[:, :, new], after.flatten(2, 3)[:, :, new], atol=1e-5, rtol=1e-5)
    assert not torch.equal(rows[:, :, new], cache.flatten(2, 3)[:, :, new])  # the step did write them


@pytest.mark.gpu
@pytest.mark.parametrize("n", [3, 8])  # 9 sequences (bucket 16, padded) and 24 (bucket 32)
def test_replayed_decode_equals_eager(n):
    model = tiny_model("llama").cuda()
    prompts = random_prompts((5, 9, 17))
    eager = Sampler(model, None, block_size=4, kv_budget="4096 tokens")
    graphed = Sampler(model, None, block_size=4, kv_budget="4096 tokens", cuda_graphs=True)
    for params in (SamplingParams(n=n, temperature=0.0, max_tokens=12),
                   SamplingParams(n=n, temperature=1.0, max_tokens=12, seed=3)):
        want = eager.generate(prompts, params)
        got = graphed.generate(prompts, params)
        assert not graphed.runner.graphs.graphs  # recorded per call, dropped after it
        for a, b in zip(want, got):
            for ca, cb in zip(a.completions, b.completions):
                assert ca.token_ids == cb.token_ids
                torch.testing.assert_close(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_recording_failure_falls_back_to_eager(monkeypatch):
    from grpo_fast.sampler import decode_graphs

    model = tiny_model("llama").cuda()
    prompts = random_prompts((5, 9))
    want = Sampler(model, None, block_size=4, kv_budget="2048 tokens").generate(
        prompts, SamplingParams(n=2, temperature=0.0, max_tokens=6))
    graphed = Sampler(model, None, block_size=4, kv_budget="2048 tokens", cuda_graphs=True)

    def broken(self, bucket):
        raise RuntimeError("capture not supported")

    monkeypatch.setattr(decode_graphs.DecodeGraphs, "_record", broken)
    with pytest.warns(UserWarning, match="decoding eagerly"):
        got = graphed.generate(prompts, SamplingParams(n=2, temperature=0.0, max_tokens=6))
    assert [c.token_ids for o in got for c in o.completions] == [c.token_ids for o in want for c in o.completions]
