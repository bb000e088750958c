"""cpu_ops.transpose_bf16 (csrc/transpose_bf16_cpu.cpp): a bf16 product computed transposed (the
sampler's bf16 decode runs its projections as W x^T) back into rows, copied bit for bit or added
into the residual stream rounded as torch's bf16 add; both x86 builds; what the decode uses it for."""
import pytest
import torch

from grpo_fast.models import cpu_ops
from fresh_process import run_fresh

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="native CPU kernels need AVX2+FMA")

SHAPES = [(576, 32), (37, 13), (8, 8), (16, 9), (1, 5), (5, 1), (1536, 32)]  # [N, M]: whole and ragged 8 x 8 blocks


def operands(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    src_t = torch.randn(n, m + 3, generator=g).bfloat16()[:, 1:m + 1]  # rows with a stride
    into = torch.randn(m, n + 2, generator=g).bfloat16()
    return src_t, into


@pytest.mark.parametrize("n,m", SHAPES)
def test_copy_is_torchs_transpose_bit_for_bit(n, m):
    src_t, _ = operands(n, m, n * m)
    src_t[0, 0] = float("nan")
    src_t[-1, -1] = -0.0
    got = cpu_ops.transpose_bf16(src_t)
    assert got.is_contiguous() and torch.equal(got.view(torch.int16), src_t.t().contiguous().view(torch.int16))


@pytest.mark.parametrize("n,m", SHAPES)
def test_add_is_torchs_bf16_add_bit_for_bit(n, m):
    """into (a column slice of a wider matrix: the columns beside it untouched) += src_t^T, each
    sum rounded once to bf16 as torch's add rounds it: ties to even included (1 + 2^-8)."""
    src_t, wide = operands(n, m, n + m)
    src_t[0, 0], wide[0, 1] = 2 ** -8, 1.0  # 1 + 2^-8: a bf16 tie, to even (1.0)
    want = wide.clone()
    want[:, 1:n + 1].add_(src_t.t())
    got = wide.clone()
    cpu_ops.transpose_bf16(src_t, into=got[:, 1:n + 1])
    assert torch.equal(got, want)
    assert got[0, 1] == 1.0


def test_the_baseline_x86_build_agrees(tmp_path):
    src_t, into = operands(37, 13, 5)
    torch.save((src_t, into), tmp_path / "in.pt")
    run_fresh(f"""
        import torch
        from grpo_fast.models import cpu_ops
        src_t, into = torch.load({str(tmp_path / "in.pt")!r})
        torch.save([cpu_ops.transpose_bf16(src_t), cpu_ops.transpose_bf16(src_t, into=into[:, :37].clone())],
                   {str(tmp_path / "out.pt")!r})
        """, env={"GRPO_FAST_NO_AVX2": "1"})
    portable = torch.load(tmp_path / "out.pt")
    assert torch.equal(portable[0], cpu_ops.transpose_bf16(src_t))
    assert torch.equal(portable[1], cpu_ops.transpose_bf16(src_t, into=into[:, :37].clone()))


def test_arguments_are_checked():
    src_t = torch.randn(6, 4).bfloat16()
    with pytest.raises(ValueError, match="src_t"):
        cpu_ops.transpose_bf16(src_t.float())
    with pytest.raises(ValueError, match="into"):
        cpu_ops.transpose_bf16(src_t, into=torch.zeros(6, 4).bfloat16())  # not [M, N]
    with pytest.raises(ValueError, match="into"):
        cpu_ops.transpose_bf16(src_t, into=torch.zeros(4, 6))  # not bf16


def test_the_bf16_decode_takes_it(monkeypatch):
    """A plain bf16 model's decode: q, k, v come back through the native copy, o's and the MLP's
    outputs through the native add into the residual (counted), and the sampler's tokens and
    log-probs are those of torch's copies and adds (the transposes are exact; the add rounds as
    torch's). The W x^T paths: packed weights off (test_packed_weights.py)."""
    from grpo_fast.models import decode_fast_paths
    from grpo_fast.sampler import Sampler, SamplingParams
    from test_sampler import random_prompts, tiny_model

    monkeypatch.setenv("GRPO_FAST_NO_PACKED_WEIGHTS", "1")
    calls = []
    real = cpu_ops.transpose_bf16_checked
    monkeypatch.setattr(cpu_ops, "transpose_bf16_checked", lambda *a: calls.append(a[2]) or real(*a))
    model = tiny_model("llama", seed=8).to(torch.bfloat16).eval()
    sampler = Sampler(model, None, block_size=4, kv_budget="2048 tokens")
    prompts = random_prompts((3, 9, 17), seed=2)
    params = SamplingParams(n=3, temperature=0.0, max_tokens=8)
    fast = sampler.generate(prompts, params)
    # per decode step (7) and layer (2): q, k, v copied back; o's and the MLP's products added in
    assert calls.count(False) >= 3 * 2 * 7 and calls.count(True) >= 2 * 2 * 7
    monkeypatch.setattr(decode_fast_paths, "_rows", lambda out_t: out_t.t().contiguous())
    monkeypatch.setattr(decode_fast_paths, "_add_rows_", lambda into, out_t: into.add_(out_t.t()))
    torch_path = sampler.generate(prompts, params)
    assert [c.token_ids for o in fast for c in o.completions] == [c.token_ids for o in torch_path for c in o.completions]
    assert [c.logprobs for o in fast for c in o.completions] == [c.logprobs for o in torch_path for c in o.completions]
