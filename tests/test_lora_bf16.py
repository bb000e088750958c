"""peft's fp32 adapters over a bf16 base on the sampler's decode path (csrc/lora_bf16_cpu.cpp,
models/decode_fast_paths._mixed): out = bf16(float(x W^T + b) + sum_l s_l (float(x) A_l^T) B_l^T),
peft's forward for a bf16 model (its adapters stay fp32: autocast_adapter_dtype).

The kernel against that math in float64 (within one bf16 step, plus fp32 summation error), its bf16 rounding against torch's bit for bit, both x86 builds; the sampler on a
LoRA-wrapped bf16 model against the module path (peft's own forward), tokens equal and log-probs
to bf16 noise, with live adapter updates seen by the next call.
"""
import pytest
import torch

from grpo_fast.models import cpu_ops
from grpo_fast.sampler import Sampler, SamplingParams
from test_sampler import _one_thread, random_prompts, tiny_model  # noqa: F401 (autouse fixture)
from fresh_process import run_fresh

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="native CPU kernels need AVX2+FMA")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def exact(y, x, terms):
    """The math in float64 (the reference the fp32 kernel and torch both approximate)."""
    out = y.double()
    for a, b, s in terms:
        out = out + (x.double() @ a.double().T) @ b.double().T * s
    return out


def bf16_step(v: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |v| (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(1e-30))) - 7)


def tolerance(y, x, terms):
    """What the kernel may be off from the exact value: its final bf16 rounding (half a step;
    one allowed) plus its fp32 sums' error, which scales with the magnitudes summed, not with
    the result (y and the adapter term can cancel): 1e-5 of sum |y| + |x| |A|^T |B|^T s."""
    magnitude = y.double().abs()
    for a, b, s in terms:
        magnitude = magnitude + (x.double().abs() @ a.double().abs().T) @ b.double().abs().T * abs(s)
    return bf16_step(exact(y, x, terms).float()).double() + 1e-5 * magnitude


@pytest.mark.parametrize("M,K,N", [(32, 576, 1536), (7, 64, 700), (5, 64, 37), (9, 33, 16), (1, 8, 1),
                                   (70, 40, 100)])
@pytest.mark.parametrize("ranks", [(16,), (3, 8)])
def test_kernel_matches_the_math_within_a_bf16_step(M, K, N, ranks):
    """Ragged N (a last block under 16 lanes; 700: a last chunk of 60 outputs when split; on zmm
    an odd 16-output block after the pairs), M not a multiple of the 4-row tile (70: split over
    the threads on zmm too), K not a multiple of 8 or 16 (the down pass's tail), two terms
    (scaled one after the other), and x and out as column slices of wider matrices."""
    g = torch.Generator().manual_seed(M * K + N)
    x = torch.randn(M, K + 3, generator=g).bfloat16()[:, 2:K + 2]  # rows with a stride
    y = torch.randn(M, N + 5, generator=g).bfloat16()
    terms = [(torch.randn(r, K, generator=g) / K ** 0.5, torch.randn(N, r, generator=g), 0.5 + i)
             for i, r in enumerate(ranks)]
    want = exact(y[:, 1:N + 1], x, terms)
    out = y.clone()
    cpu_ops.lora_add_bf16_(out[:, 1:N + 1], x, terms)
    assert torch.equal(out[:, 0], y[:, 0]) and torch.equal(out[:, N + 1:], y[:, N + 1:])  # untouched
    err = (out[:, 1:N + 1].double() - want).abs()
    assert (err <= tolerance(y[:, 1:N + 1], x, terms)).all(), err.max()
    # and against peft's own torch ops: mostly bit-equal (fp32 sums in another order can round
    # the other way at a bf16 tie)
    peft = y[:, 1:N + 1]
    for a, b, s in terms:
        peft = peft + torch.nn.functional.linear(torch.nn.functional.linear(x.float(), a), b) * s
    assert (out[:, 1:N + 1] != peft.bfloat16()).float().mean() < 0.01
    # split by blocks of outputs over libgomp's team (the sampler's per-module decode): each
    # output computed whole by one chunk, so bitwise the one-thread result, the ragged end included
    from grpo_fast.native import openmp_regions
    from grpo_fast.torch_threads import set_torch_threads

    threads = torch.get_num_threads()
    set_torch_threads(2)
    try:
        split = y.clone()
        with openmp_regions():
            cpu_ops.lora_add_bf16_(split[:, 1:N + 1], x, terms)
    finally:
        set_torch_threads(threads)
    assert torch.equal(split, out)


@pytest.mark.parametrize("M,K,N", [(32, 576, 1536), (40, 64, 70), (7, 64, 37), (9, 33, 16), (1, 8, 1)])
@pytest.mark.parametrize("ranks", [(16,), (3, 8)])
@pytest.mark.parametrize("layout", ["x", "xt"])
def test_transposed_kernel_matches_the_math_within_a_bf16_step(M, K, N, ranks, layout):
    """lora_add_bf16_t_: the same math into a transposed base product out_t [N, M], the input as
    x [M, K] or as x^T [K, M]. Ragged M (a last vector of rows under 8 lanes; 40: a second tile
    of rows), an odd number of ranks (3 + 8), two terms, out_t and the input as column slices of
    wider matrices; split over libgomp's team it is bitwise the one-thread result."""
    g = torch.Generator().manual_seed(M * K + N + len(ranks))
    x = torch.randn(M, K, generator=g).bfloat16()
    y = torch.randn(M, N, generator=g).bfloat16()
    terms = [(torch.randn(r, K, generator=g) / K ** 0.5, torch.randn(N, r, generator=g), 0.5 + i)
             for i, r in enumerate(ranks)]
    want = exact(y, x, terms)  # [M, N]
    wide_t = torch.randn(N, M + 4, generator=g).bfloat16()  # out_t in columns 1..M
    wide_t[:, 1:M + 1] = y.T
    given = dict(x=torch.cat([x, x[:, :3]], 1)[:, :K]) if layout == "x" else \
        dict(xt=torch.cat([x.T, x.T[:, :2]], 1)[:, :M])
    out_t = wide_t.clone()
    cpu_ops.lora_add_bf16_t_(out_t[:, 1:M + 1], terms, **given)
    assert torch.equal(out_t[:, 0], wide_t[:, 0]) and torch.equal(out_t[:, M + 1:], wide_t[:, M + 1:])  # untouched
    got = out_t[:, 1:M + 1].T
    err = (got.double() - want).abs()
    assert (err <= tolerance(y, x, terms)).all(), err.max()
    row_major = cpu_ops.lora_add_bf16_(y.clone(), x, terms)  # the other layout: mostly bit-equal
    assert (got != row_major).float().mean() < 0.01
    from grpo_fast.native import openmp_regions
    from grpo_fast.torch_threads import set_torch_threads

    threads = torch.get_num_threads()
    set_torch_threads(2)
    try:
        split = wide_t.clone()
        with openmp_regions():
            cpu_ops.lora_add_bf16_t_(split[:, 1:M + 1], terms, **given)
    finally:
        set_torch_threads(threads)
    assert torch.equal(split, out_t)


def test_transposed_arguments_are_checked():
    x, out_t = torch.randn(4, 8).bfloat16(), torch.zeros(6, 4).bfloat16()
    term = [(torch.randn(2, 8), torch.randn(6, 2), 1.0)]
    with pytest.raises(ValueError, match="exactly one of x"):
        cpu_ops.lora_add_bf16_t_(out_t, term)
    with pytest.raises(ValueError, match="exactly one of x"):
        cpu_ops.lora_add_bf16_t_(out_t, term, x=x, xt=x.T)
    with pytest.raises(ValueError, match="out_t has 4 columns"):
        cpu_ops.lora_add_bf16_t_(out_t, term, x=x[:3])
    with pytest.raises(ValueError, match="out_t has 4 columns"):
        cpu_ops.lora_add_bf16_t_(out_t, term, xt=x.T.contiguous()[:, :3])
    with pytest.raises(ValueError, match=r"lora\[0\] B"):
        cpu_ops.lora_add_bf16_t_(out_t[:5], term, x=x)
    with pytest.raises(ValueError, match="xt"):
        cpu_ops.lora_add_bf16_t_(out_t, term, xt=x.T)  # x^T as a view of x: not unit stride along m


def test_rounding_is_torchs():
    """x = 1, A = 1, s = 1: the kernel rounds 0 + B[n] to bf16 (no summation error), as torch's
    float -> bfloat16 conversion does: ties to even, overflow to inf, NaN, subnormals, zeros."""
    one = 1.0
    vals = [one + 2 ** -8, one + 3 * 2 ** -8, -(one + 2 ** -8), 1.00390625 + 2 ** -20, 3.0e38, -3.4e38,
            float("inf"), float("-inf"), float("nan"), 1e-40, -0.0, 0.0, 65504.0, 2 ** -126, 1 / 3]
    vals = vals * 3  # 45 outputs: two whole 16-lane blocks and a ragged one
    b = torch.tensor(vals, dtype=torch.float32).reshape(-1, 1)  # [N, 1]
    for rows in (1, 5):
        x = torch.ones(rows, 1).bfloat16()
        out = torch.zeros(rows, len(vals)).bfloat16()
        want = (out.float() + (x.float() @ torch.ones(1, 1)) @ b.T).bfloat16()  # exact sums: only the rounding
        cpu_ops.lora_add_bf16_(out, x, [(torch.ones(1, 1), b, 1.0)])
        assert torch.equal(out.view(torch.int16)[:, ~torch.isnan(b[:, 0])],
                           want.view(torch.int16)[:, ~torch.isnan(b[:, 0])])
        assert torch.isnan(out[:, torch.isnan(b[:, 0])].float()).all()


def test_the_term_is_scaled_then_added_as_peft_rounds_it():
    """peft computes y + (sum * s): the product rounded to fp32, then the sum. A fused multiply-add
    rounds once, which at a bf16 tie can flip the result: y = 1, sum = b (x = A = 1, r = 1) and
    b * s = 0.5 + 2^-8 + 2^-24 + 2^-26 exactly. fl(b * s) drops the 2^-26, 1 + it is then an fp32
    tie that rounds to 1.5 + 2^-8, a bf16 tie that rounds to 1.5; unrounded, the sum clears both
    ties and gives 1.5 + 2^-7. Every layout, and the inputs as one-row / one-column views whose
    other stride torch leaves arbitrary ([1, K] and [N, 1] transposes)."""
    b = torch.full((16, 1), 1166089 * 2.0 ** -22)  # 1166089 * 29 = 2^25 + 2^18 + 5
    s = 29 / 16
    x, a = torch.ones(1, 1).bfloat16(), torch.ones(1, 1)
    y = torch.ones(1, 16).bfloat16()
    peft = (y.float() + torch.nn.functional.linear(torch.nn.functional.linear(x.float(), a), b) * s).bfloat16()
    fused = (y.double() + b.T.double() * s).float().bfloat16()  # one rounding to fp32
    assert (peft == 1.5).all() and (fused == 1.5078125).all()  # the case tells the two apart
    assert y.T.stride() == (1, 16) and x.T.stride() == (1, 1)  # torch's strides of the one-row / one-column views
    assert torch.equal(cpu_ops.lora_add_bf16_(y.clone(), x, [(a, b, s)]), peft)
    for given in (dict(x=x), dict(xt=x.T)):
        out_t = y.clone().T  # [16, 1], strides (1, 16)
        assert torch.equal(cpu_ops.lora_add_bf16_t_(out_t, [(a, b, s)], **given).T, peft)


def test_the_baseline_x86_build_agrees(tmp_path):
    """GRPO_FAST_NO_AVX2=1 (read once per process, so in a fresh one): the portable loops give
    the AVX2 kernels' results, both layouts (the transposed one with x as rows and as x^T)."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(7, 40, generator=g).bfloat16(), torch.randn(7, 37, generator=g).bfloat16()
    terms = [(torch.randn(5, 40, generator=g), torch.randn(37, 5, generator=g), 1.5)]
    torch.save((x, y, terms), tmp_path / "inputs.pt")
    run_fresh(f"""
        import torch
        from grpo_fast.models import cpu_ops
        x, y, terms = torch.load({str(tmp_path / "inputs.pt")!r})
        outs = [cpu_ops.lora_add_bf16_(y.clone(), x, terms),
                cpu_ops.lora_add_bf16_t_(y.T.contiguous(), terms, x=x).T,
                cpu_ops.lora_add_bf16_t_(y.T.contiguous(), terms, xt=x.T.contiguous()).T]
        torch.save(outs, {str(tmp_path / "portable.pt")!r})
        """, env={"GRPO_FAST_NO_AVX2": "1"})
    avx2 = [cpu_ops.lora_add_bf16_(y.clone(), x, terms), cpu_ops.lora_add_bf16_t_(y.T.contiguous(), terms, x=x).T,
            cpu_ops.lora_add_bf16_t_(y.T.contiguous(), terms, xt=x.T.contiguous()).T]
    for ours, portable in zip(avx2, torch.load(tmp_path / "portable.pt")):  # row-major, x rows, x^T
        err = (ours.double() - portable.double()).abs()
        assert (err <= tolerance(y, x, terms)).all(), err.max()
        assert (ours != portable).float().mean() < 0.05  # not just within a step: mostly bit-equal


def test_the_zmm_passes_agree_with_the_avx2_ones(tmp_path):
    """GRPO_FAST_NO_AVX512=1 (read once per process, so in a fresh one) keeps the AVX2 passes.
    The zmm up pass sums each output as they do; the zmm down pass sums k in 16 lanes instead of
    8, so the two agree within the kernel's tolerance and are mostly bit-equal."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(70, 200, generator=g).bfloat16(), torch.randn(70, 1000, generator=g).bfloat16()
    terms = [(torch.randn(16, 200, generator=g) / 200 ** 0.5, torch.randn(1000, 16, generator=g), 2.0),
             (torch.randn(3, 200, generator=g) / 200 ** 0.5, torch.randn(1000, 3, generator=g), 0.5)]
    torch.save((x, y, terms), tmp_path / "inputs.pt")
    script = f"""
        import torch
        from grpo_fast.models import cpu_ops
        x, y, terms = torch.load({str(tmp_path / "inputs.pt")!r})
        torch.save([cpu_ops.lora_add_bf16_(y[:m].clone(), x[:m], terms) for m in (1, 32, 70)], {{out!r}})
        """
    run_fresh(script.format(out=str(tmp_path / "zmm.pt")))
    run_fresh(script.format(out=str(tmp_path / "avx2.pt")), env={"GRPO_FAST_NO_AVX512": "1"})
    for m, zmm, avx2 in zip((1, 32, 70), torch.load(tmp_path / "zmm.pt"), torch.load(tmp_path / "avx2.pt")):
        err = (zmm.double() - avx2.double()).abs()
        assert (err <= tolerance(y[:m], x[:m], terms)).all(), (m, err.max())
        assert (zmm != avx2).float().mean() < 0.02, m


def test_arguments_are_checked():
    x, out = torch.randn(4, 8).bfloat16(), torch.zeros(4, 6).bfloat16()
    term = [(torch.randn(2, 8), torch.randn(6, 2), 1.0)]
    with pytest.raises(ValueError, match="out"):
        cpu_ops.lora_add_bf16_(out.float(), x, term)
    with pytest.raises(ValueError, match="out has 4 rows, x has 3"):
        cpu_ops.lora_add_bf16_(out, x[:3], term)
    with pytest.raises(ValueError, match=r"lora\[0\] B"):
        cpu_ops.lora_add_bf16_(out, x, [(torch.randn(2, 8), torch.randn(5, 2), 1.0)])
    with pytest.raises(ValueError, match=r"lora\[0\] A"):
        cpu_ops.lora_add_bf16_(out, x, [(torch.randn(2, 8).bfloat16(), torch.randn(6, 2), 1.0)])


def bf16_lora_model(seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = tiny_model("llama", seed=seed).to(torch.bfloat16)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules=TARGETS)
    model = get_peft_model(base, cfg).eval()
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.lora_A["default"].weight.dtype == torch.float32  # peft's default over bf16
    return model


def greedy(sampler, prompts):
    return sampler.generate(prompts, SamplingParams(n=3, temperature=0.0, max_tokens=8))


def logprobs(outs):
    return torch.tensor([lp for o in outs for c in o.completions for lp in c.logprobs])


def tokens(outs):
    return [c.token_ids for o in outs for c in o.completions]


def peft_forward_greedy(sampler, prompts, monkeypatch):
    """greedy() with every LoRA linear run as peft's own forward (the module path)."""
    from grpo_fast.models import decode_fast_paths

    with monkeypatch.context() as m:
        m.setattr(decode_fast_paths, "_fp32_over_bf16", lambda *_: False)
        return greedy(sampler, prompts)


def scale_lora_b(model, factor: float) -> None:
    """An in-place update of every lora_B (what an optimizer step does to the adapters)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(factor)


def test_sampler_takes_the_native_add_and_equals_peft(monkeypatch):
    """Every adapter of a bf16 LoRA policy goes through the native add (counted), and the sampler
    gives peft's forward's tokens and log-probs (to bf16 noise); an in-place update of lora_B
    (an optimizer step) shows in the next call's log-probs. The W x^T paths (packed weights off:
    test_packed_weights.py covers those)."""
    monkeypatch.setenv("GRPO_FAST_NO_PACKED_WEIGHTS", "1")
    model = bf16_lora_model()
    calls = []
    real, real_t = cpu_ops.lora_add_bf16_checked_, cpu_ops.lora_add_bf16_t_checked_
    monkeypatch.setattr(cpu_ops, "lora_add_bf16_checked_", lambda *a: calls.append("rows") or real(*a))
    monkeypatch.setattr(cpu_ops, "lora_add_bf16_t_checked_",
                        lambda *a: calls.append(("t", a[2], len(a[0]))) or real_t(*a))
    sampler = Sampler(model, None, block_size=4, kv_budget="2048 tokens")
    prompts = random_prompts((3, 9, 17), seed=5)
    fast = greedy(sampler, prompts)
    # per decode step (7 after the prefill's first token) and layer (2), every product as W x^T
    # (the plain bf16 model's path) and its adapters added by the transposed kernel: q, k, v in one
    # call (x as rows), o in one; the MLP's gate and up in one, down in one (its input as x^T).
    # (the row-major add is the fallback for inputs with strided rows, which the decode does not make)
    assert calls.count("rows") == 0
    assert calls.count(("t", False, 3)) >= 2 * 7 and calls.count(("t", False, 2)) >= 2 * 7
    assert calls.count(("t", False, 1)) >= 2 * 7 and calls.count(("t", True, 1)) >= 2 * 7
    taken = len(calls)
    module_path = peft_forward_greedy(sampler, prompts, monkeypatch)
    assert len(calls) == taken
    assert tokens(fast) == tokens(module_path)
    torch.testing.assert_close(logprobs(fast), logprobs(module_path), atol=3e-2, rtol=0)
    scale_lora_b(model, -3.0)
    updated = greedy(sampler, prompts)
    assert (logprobs(updated) - logprobs(fast)).abs().max() > 0.1


def test_torch_fallback_is_pefts_math(monkeypatch):
    """Without the native kernels (GRPO_FAST_NO_CPU_LINEAR=1) a mixed layer runs peft's ops in
    peft's order: bit-equal to the module."""
    from grpo_fast.models.decode_fast_paths import FastPaths

    model = bf16_lora_model(seed=2)
    monkeypatch.setenv("GRPO_FAST_NO_CPU_LINEAR", "1")
    v_proj = model.base_model.model.model.layers[1].self_attn.v_proj
    fast = FastPaths()
    parts = fast.parts(v_proj)
    assert parts is not None and parts.mixed == []
    x = torch.randn(6, v_proj.in_features).bfloat16()
    with torch.no_grad():
        assert torch.equal(fast.linear(v_proj, x), v_proj(x))


def test_bf16_decode_runs_its_norms_natively_as_the_modules_round(monkeypatch):
    """A bf16 model's decode: every RMSNorm goes through the native bf16 kernel (counted), and the
    sampler gives the module path's tokens and log-probs (the kernel rounds where the module's
    bf16 ops round), plain and LoRA-wrapped."""
    from grpo_fast.models import llama_family

    norms = []
    real_norm = cpu_ops.rms_norm
    monkeypatch.setattr(cpu_ops, "rms_norm", lambda *a: norms.append(a[0].dtype) or real_norm(*a))
    prompts = random_prompts((3, 9, 17), seed=7)
    for model in (tiny_model("llama", seed=3).to(torch.bfloat16).eval(), bf16_lora_model(seed=3)):
        norms.clear()
        sampler = Sampler(model, None, block_size=4, kv_budget="2048 tokens")
        fast = greedy(sampler, prompts)
        # 2 layers x 2 norms + the final one per forward (a prefill and 7 steps)
        assert len(norms) >= 5 * 8 and set(norms) == {torch.bfloat16}
        with monkeypatch.context() as m:  # the modules' own ops
            m.setattr(llama_family, "rms_norm", lambda norm, x: norm(x))
            taken = len(norms)
            module_path = greedy(sampler, prompts)
            assert len(norms) == taken
        assert tokens(fast) == tokens(module_path)
        torch.testing.assert_close(logprobs(fast), logprobs(module_path), atol=2e-2, rtol=0)


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_the_transposed_mlp_computes_the_module(monkeypatch, mlp_bias):
    """A LoRA-wrapped bf16 gated MLP on the decode's transposed path (gate, up, down as W x^T, the
    adapters added by the transposed kernel) equals the module to bf16 noise, with biases too
    (b + W x^T in one op, as F.linear rounds it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from grpo_fast.models.decode_fast_paths import FastPaths
    from test_sampler import COMMON

    torch.manual_seed(4)
    base = LlamaForCausalLM(LlamaConfig(**COMMON, mlp_bias=mlp_bias)).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                            target_modules=TARGETS)).eval()
    mlp = model.base_model.model.model.layers[0].mlp
    calls = []
    real_t = cpu_ops.lora_add_bf16_t_checked_
    monkeypatch.setattr(cpu_ops, "lora_add_bf16_t_checked_", lambda *a: calls.append((a[2], len(a[0]))) or real_t(*a))
    x = torch.randn(9, mlp.gate_proj.in_features).bfloat16()
    into = torch.randn(9, mlp.down_proj.out_features).bfloat16()
    with torch.no_grad():
        want = (into.float() + mlp(x).float())
        got = FastPaths().gated_mlp_add_(into.clone(), mlp, x).float()
    assert calls == [(False, 2), (True, 1)]  # gate and up in one call, then down
    torch.testing.assert_close(got, want, atol=1e-2, rtol=2 ** -6)  # a bf16 step or two of noise (values ~1)


def test_q_k_v_take_one_transposed_add_and_compute_the_modules(monkeypatch):
    """A LoRA-wrapped bf16 layer's q, k, v: W x^T per module (Qwen2's with their biases, in the
    same op), all three adapters in one native call, equal to the modules to bf16 noise."""
    from grpo_fast.models.decode_fast_paths import FastPaths

    calls = []
    real, real_t = cpu_ops.lora_add_bf16_checked_, cpu_ops.lora_add_bf16_t_checked_
    monkeypatch.setattr(cpu_ops, "lora_add_bf16_checked_", lambda *a: calls.append("rows") or real(*a))
    monkeypatch.setattr(cpu_ops, "lora_add_bf16_t_checked_", lambda *a: calls.append(len(a[0])) or real_t(*a))
    for kind, want_calls in (("llama", [3]), ("qwen2", [3])):  # qwen2: with biases
        from peft import LoraConfig, get_peft_model

        base = tiny_model(kind, seed=6).to(torch.bfloat16)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                target_modules=TARGETS)).eval()
        attn = model.base_model.model.model.layers[1].self_attn
        modules = (attn.q_proj, attn.k_proj, attn.v_proj)
        x = torch.randn(7, attn.q_proj.in_features).bfloat16()
        calls.clear()
        with torch.no_grad():
            got = FastPaths().linears(modules, x)
            want = [m(x) for m in modules]
        assert calls == want_calls, kind
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.is_contiguous()
            torch.testing.assert_close(g.float(), w.float(), atol=1e-2, rtol=2 ** -6)


def test_several_outputs_in_one_call_equal_one_call_each():
    """lora_add_bf16_t_many_: three outputs of one input (different N, ranks and term counts, one
    without terms) give bitwise what each gets from its own call; split over libgomp's team too."""
    from grpo_fast.native import openmp_regions
    from grpo_fast.torch_threads import set_torch_threads

    g = torch.Generator().manual_seed(11)
    M, K = 13, 40
    x = torch.randn(M, K, generator=g).bfloat16()
    shapes = [(70, (4,)), (9, (3, 2)), (33, ())]
    ys = [torch.randn(n, M, generator=g).bfloat16() for n, _ in shapes]
    loras = [[(torch.randn(r, K, generator=g), torch.randn(n, r, generator=g), 0.7 + r) for r in ranks]
             for n, ranks in shapes]
    one_each = [cpu_ops.lora_add_bf16_t_(y.clone(), lora, x=x) if lora else y.clone() for y, lora in zip(ys, loras)]
    threads = torch.get_num_threads()
    set_torch_threads(2)
    try:
        for split in (False, True):
            together = [y.clone() for y in ys]
            with openmp_regions(split):
                cpu_ops.lora_add_bf16_t_many_(together, loras, x=x)
            for a, b in zip(together, one_each):
                assert torch.equal(a, b)
    finally:
        set_torch_threads(threads)
    with pytest.raises(ValueError, match=r"outs_t\[1\] has 12 columns"):
        cpu_ops.lora_add_bf16_t_many_([ys[0], ys[1][:, :12]], loras[:2], x=x)
    with pytest.raises(ValueError, match="equal, non-zero lengths"):
        cpu_ops.lora_add_bf16_t_many_(ys, loras[:2], x=x)


def test_adapters_on_some_modules_only(monkeypatch):
    """peft's default targets for Llama are q_proj and v_proj; here down_proj too. The modules
    without adapters take the plain path beside the adapted ones (q and v each alone on the
    transposed add, down reading the MLP's inner activations as x^T), and the sampler gives
    peft's forward's tokens and log-probs. The W x^T paths (packed weights off: test_packed_weights.py)."""
    from peft import LoraConfig, get_peft_model

    monkeypatch.setenv("GRPO_FAST_NO_PACKED_WEIGHTS", "1")
    torch.manual_seed(9)
    base = tiny_model("llama", seed=9).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj", "down_proj"])).eval()
    calls = []
    real_t = cpu_ops.lora_add_bf16_t_checked_
    monkeypatch.setattr(cpu_ops, "lora_add_bf16_t_checked_", lambda *a: calls.append((a[2], len(a[0]))) or real_t(*a))
    sampler = Sampler(model, None, block_size=4, kv_budget="2048 tokens")
    prompts = random_prompts((4, 11, 6), seed=3)
    fast = greedy(sampler, prompts)
    assert calls.count((False, 1)) >= 2 * 2 * 7 and calls.count((True, 1)) >= 2 * 7  # q, v; down
    module_path = peft_forward_greedy(sampler, prompts, monkeypatch)
    assert tokens(fast) == tokens(module_path)
    torch.testing.assert_close(logprobs(fast), logprobs(module_path), atol=3e-2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_biased_layer_on_the_transposed_path_is_f_linear_bit_for_bit(dtype):
    """A plain layer with a bias (Qwen2's q / k / v) at a few rows on the transposed path:
    b + W x^T in one op is F.linear(x, W, b) bit for bit in bf16 (W x^T, then + b, rounded twice
    and differed from the module in ~27% of the outputs), and the LM head's chunked form too;
    fp32 to its rounding."""
    from torch import nn

    from grpo_fast.models.decode_fast_paths import FastPaths

    g = torch.Generator().manual_seed(12)
    layer = nn.Linear(96, 80).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(80, 96, generator=g))
        layer.bias.copy_(torch.randn(80, generator=g) * 3)
    x = torch.randn(5, 96, generator=g).to(dtype)  # 5 rows: below the fp32 native kernel's 8
    fast = FastPaths()
    with torch.no_grad():
        want = layer(x)
        got, head = fast.linear(layer, x), fast.lm_head(layer, x, rows_per_chunk=32)
        twice = (torch.mm(layer.weight, x.t()) + layer.bias[:, None]).t()
    if dtype == torch.bfloat16:
        assert torch.equal(got, want) and torch.equal(head, want.float())
        assert not torch.equal(twice, want)  # the case tells the two roundings apart
    else:  # fp32: MKL sums W x^T in another order than x W^T, so to fp32 rounding
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(head, want, atol=1e-5, rtol=1e-5)
