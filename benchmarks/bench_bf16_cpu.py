"""bf16 on the CPU: what each of the bf16 paths changes, measured by switching it off and on in
one process (alternating, every repeat printed), SmolLM2-135M + LoRA r = 16 in bf16 (peft keeps
the adapters fp32: its default over a bf16 base).

1. train: forward + backward of the training pass (`completion_hidden`, cached layout) over
   B x G = 4 x 8 rows of P = 40 prompt and C = 128 completion tokens, one group per micro-batch,
   in five configurations:
   - neither: peft's forward for the LoRA layers (fp32 adapters over the bf16 base), HF's SDPA in
     bf16 and PyTorch's SwiGLU / RMSNorm ops (the code before);
   - lean: grpo_fast.lean_lora's promoted-copy addmm for those layers;
   - fp32 attention: grpo_fast/train/fp32_attention.py (SDPA over bf16 CPU tensors in fp32);
   - both;
   - both + one-pass: the bf16 one-pass SwiGLU and RMSNorm kernels too (what runs now).
2. sample: the group sampler, 4 x 8 x 64 forced tokens, tokens/s, on the plain bf16 model and
   the LoRA-wrapped one: with the native bf16 RMSNorm (csrc/rms_norm_cpu.cpp) or the modules'
   ops; LoRA's terms through the native add (csrc/lora_bf16_cpu.cpp) or peft's forward (the code
   before both); our kernels' regions on libgomp's team (native.openmp_regions) or our own pool.

3. add: the decode's base product + LoRA add at 32 rows, SmolLM2's four projection shapes, the
   add's up pass split over libgomp's team (as the per-module decode runs it) or on one thread.

    python benchmarks/bench_bf16_cpu.py [--repeats 4] [--only train|sample|add]

Run it alone: it measures the machine as much as the code otherwise.
"""
import argparse
import contextlib
import statistics
import time

import torch


def _train_case(P: int, C: int, B: int = 4, G: int = 8):
    from grpo_fast.config import load_config
    from grpo_fast.train.model import load_policy, policy_modules
    from grpo_fast.train.rollout_batch import make_batch

    cfg = load_config(None, {"lora.r": 16, "lora.lora_alpha": 32, "model.dtype": "bfloat16"})
    model, _, _ = load_policy(cfg.model, cfg.lora, seed=0)
    model.train()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (P,), generator=g).tolist() for _ in range(B)]
    comps = [torch.randint(100, 40000, (C,), generator=g).tolist() for _ in range(B * G)]
    batch = make_batch([p for p in prompts for _ in range(G)], comps, pad_id=0)
    w = torch.randn(model.config.hidden_size, generator=g).bfloat16()
    return policy_modules(model).decoder, batch, w, B, G


@contextlib.contextmanager
def _switched(lean: bool, fp32_attention: bool, one_pass: bool = True):
    """The training-pass paths off (peft's forward, bf16 SDPA, PyTorch's SwiGLU / RMSNorm ops) or
    on, for the duration."""
    import grpo_fast.lean_lora as lean_lora
    import grpo_fast.native as native
    import grpo_fast.train.packed_forward as packed_forward
    from grpo_fast.train import fp32_attention as fa

    promotes, attention, kernels = lean_lora._promotes_to, packed_forward.fp32_cpu_attention, native._LEAN
    if not lean:
        lean_lora._promotes_to = lambda *_: False  # the lean path hands the call to peft's forward
    if not fp32_attention:
        packed_forward.fp32_cpu_attention = lambda enabled=True: fa.fp32_cpu_attention(False)
    if not one_pass:  # the bf16 one-pass kernels unknown: SiluMulFunction / RMSNorm run PyTorch's ops
        native._LEAN = {torch.float32: kernels[torch.float32]}
    try:
        yield
    finally:
        lean_lora._promotes_to, packed_forward.fp32_cpu_attention, native._LEAN = promotes, attention, kernels


def bench_train(repeats: int, P: int, C: int) -> None:
    from grpo_fast.train.packed_forward import completion_hidden

    decoder, batch, w, B, G = _train_case(P, C)

    def forward_backward():
        for k in range(B):
            hidden = completion_hidden(decoder, batch.select(slice(k * G, (k + 1) * G)))
            (hidden @ w).float().sum().backward()

    configs = {"neither (before)": (False, False, False), "lean LoRA": (True, False, False),
               "fp32 attention": (False, True, False), "both": (True, True, False),
               "both + one-pass (now)": (True, True, True)}
    def seconds(_name):
        t = time.perf_counter()
        forward_backward()
        return time.perf_counter() - t

    print(f"train: forward + backward, {B} x {G} rows, P = {P}, C = {C}, bf16, seconds", flush=True)
    times = _alternate({name: lambda c=c: _switched(*c) for name, c in configs.items()}, repeats, seconds)
    base = statistics.median(times["neither (before)"])
    _summary(times, "s", lambda med: f"{base / med:4.2f}x")


def bench_sample(repeats: int) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_fast.models import default_model_dir
    from grpo_fast.sampler import Sampler, SamplingParams

    path = str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(path)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    torch.manual_seed(0)
    wrapped = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16),
                             LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, init_lora_weights=False,
                                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"])).eval()
    questions = ["What is 12 + 35?", "What is 7 * 8?", "Compute 100 - 37.", "What is 9 + 10?"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
               for q in questions]
    prompts = [p["input_ids"] if hasattr(p, "keys") else p for p in prompts]
    params = SamplingParams(n=8, temperature=1.0, max_tokens=64, ignore_eos=True, seed=0)
    # (name, model, the native add, the native bf16 norms, our regions on libgomp's team)
    runs = [("plain bf16 (now)", plain, True, True, True), ("plain bf16, pool regions", plain, True, True, False),
            ("plain bf16, module norms", plain, True, False, True),
            ("LoRA (now)", wrapped, True, True, True), ("LoRA, pool regions", wrapped, True, True, False),
            ("LoRA, module norms", wrapped, True, False, True),
            ("LoRA, peft forward (before)", wrapped, False, False, False)]
    samplers = {name: Sampler(model, tok) for name, model in (("plain", plain), ("LoRA", wrapped))}
    sampler_of = {name: samplers["plain" if model is plain else "LoRA"] for name, model, *_ in runs}

    def tokens_per_s(name):
        t = time.perf_counter()
        outs = sampler_of[name].generate(prompts, params)
        return sum(len(c.token_ids) for o in outs for c in o.completions) / (time.perf_counter() - t)

    print("sample: 4 x 8 x 64 forced tokens, bf16, tokens/s", flush=True)
    rates = _alternate({name: lambda a=add, n=norms, o=omp: _decode_paths(a, n, o) for name, _, add, norms, omp in runs},
                       repeats, tokens_per_s)
    plain_rate = statistics.median(rates["plain bf16 (now)"])
    _summary(rates, "tok/s", lambda med: f"{med / plain_rate:4.2f}x plain")


def bench_add(repeats: int) -> None:
    """The decode's base product and LoRA add (r = 16) at 32 rows, SmolLM2's projection shapes:
    the add's up pass split over libgomp's team (native.openmp_regions, as the sampler's
    per-module decode runs it) or on one thread (outside it, and before)."""
    from grpo_fast.models import cpu_ops
    from grpo_fast.native import openmp_regions

    g = torch.Generator().manual_seed(0)
    print("add: base product + LoRA add, 32 rows, r = 16, bf16, us per call (200 calls a figure)", flush=True)
    for K, N in ((576, 1536), (1536, 576), (576, 576), (576, 192)):
        x, w = torch.randn(32, K, generator=g).bfloat16(), torch.randn(N, K, generator=g).bfloat16()
        terms = [(torch.randn(16, K, generator=g) / K ** 0.5, torch.randn(N, 16, generator=g), 2.0)]

        def us(_name):
            t = time.perf_counter()
            for _ in range(200):
                cpu_ops.lora_add_bf16_(torch.nn.functional.linear(x, w), x, terms)
            return (time.perf_counter() - t) / 200 * 1e6

        print(f" {K} -> {N}", flush=True)
        times = _alternate({"split": openmp_regions, "one thread": lambda: openmp_regions(False)}, repeats, us)
        base = statistics.median(times["one thread"])
        _summary(times, "us", lambda med: f"{base / med:4.2f}x")


def _alternate(variants: dict, repeats: int, measure) -> dict[str, list[float]]:
    """Every variant once per round, in order (so the machine's drift hits each alike), for
    1 + repeats rounds; the first round warms up and is not kept. variants: name -> a context
    manager factory that switches that variant on; measure(name) -> its figure. Every figure is
    printed; returns name -> the kept figures."""
    width = max(map(len, variants))
    kept = {name: [] for name in variants}
    for rep in range(repeats + 1):
        for name, switched in variants.items():
            with switched():
                value = measure(name)
            if rep:
                kept[name].append(value)
            print(f"  {'warm-up ' if not rep else ''}{name:{width}s} {value:7.2f}", flush=True)
    return kept


def _summary(values: dict[str, list[float]], unit: str, against) -> None:
    """Per variant: the median, against(median) (its ratio to the baseline) and every kept figure."""
    width = max(map(len, values))
    for name, vs in values.items():
        med = statistics.median(vs)
        print(f"{name:{width}s} median {med:7.2f} {unit}  ({against(med)})  runs {[round(v, 2) for v in vs]}")


@contextlib.contextmanager
def _decode_paths(native_add: bool, native_norms: bool, openmp: bool = True):
    """The decode's bf16 paths off or on for the duration: the native LoRA add (else peft's
    forward for the LoRA layers), the native bf16 RMSNorm (else the modules' ops), and our
    kernels' regions on libgomp's team (else our own pool, the code before)."""
    from grpo_fast.models import decode_fast_paths, llama_family
    from grpo_fast.sampler import model_runner

    saved = decode_fast_paths._fp32_over_bf16, llama_family.rms_norm, model_runner.openmp_regions
    if not native_add:
        decode_fast_paths._fp32_over_bf16 = lambda *_: False
    if not native_norms:
        llama_family.rms_norm = lambda norm, x: norm(x)
    if not openmp:
        model_runner.openmp_regions = lambda enabled=True: contextlib.nullcontext()
    try:
        yield
    finally:
        decode_fast_paths._fp32_over_bf16, llama_family.rms_norm, model_runner.openmp_regions = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--only", choices=["train", "sample", "add"])
    p.add_argument("--prompt-len", type=int, default=40)
    p.add_argument("--completion-len", type=int, default=128)
    a = p.parse_args()
    print(f"threads={torch.get_num_threads()} torch={torch.__version__}")
    if a.only in (None, "train"):
        bench_train(a.repeats, a.prompt_len, a.completion_len)
    if a.only in (None, "sample"):
        bench_sample(a.repeats)
    if a.only in (None, "add"):
        bench_add(a.repeats)


if __name__ == "__main__":
    main()
