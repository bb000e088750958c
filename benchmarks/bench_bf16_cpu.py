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
   before both); our kernels' regions on libgomp's team (native.openmp_regions) or our own pool;
   a LoRA layer's products as W x^T with the transposed adds or x W^T with a row-major add per
   module; the W x^T products back into rows by the native transpose or torch's copy; the
   products from oneDNN-packed weights (what runs now) or the W x^T paths.

3. add: one decoder layer's seven projections at 32 rows as the bf16 decode computes them: the
   plain model's, LoRA-wrapped now (W x^T, the adapters of modules sharing an input added in one
   transposed call) and LoRA-wrapped before (x W^T and a row-major add per module).

4. packed: the decode's products from oneDNN-packed weights (decode_fast_paths.FastPaths.packed)
   against the W x^T paths, alternating: one decoder layer's seven products at 32 rows over 30
   distinct layers (each weight streamed from DRAM, as a decode step streams them), plain and
   LoRA-wrapped (r = 16; packed: the row-major add), us per layer; then the sampler, 4 x 8 x 64
   forced tokens, plain and LoRA-wrapped SmolLM2 bf16, tok/s (each generate call's reorder
   included).

    python benchmarks/bench_bf16_cpu.py [--repeats 4] [--only train|sample|add|packed]

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
    from grpo_fast.sampler import Sampler, SamplingParams

    plain, wrapped, tok, prompts = _smollm2_bf16()
    params = SamplingParams(n=8, temperature=1.0, max_tokens=64, ignore_eos=True, seed=0)
    # name, model, then _decode_paths' switches: the native add, the native bf16 norms, our regions
    # on libgomp's team, the LoRA products as W x^T with the transposed adds, the native transposes,
    # the packed weights (the W x^T paths below run with packing off)
    runs = [("plain bf16 (now)", plain, True, True, True, True, True, True),
            ("plain bf16, W x^T", plain, True, True, True, True, True, False),
            ("plain bf16, W x^T, torch transposes", plain, True, True, True, True, False, False),
            ("plain bf16, pool regions", plain, True, True, False, True, True, True),
            ("plain bf16, module norms", plain, True, False, True, True, True, True),
            ("LoRA (now)", wrapped, True, True, True, True, True, True),
            ("LoRA, W x^T + transposed adds", wrapped, True, True, True, True, True, False),
            ("LoRA, W x^T, torch transposes", wrapped, True, True, True, True, False, False),
            ("LoRA, x W^T + row-major adds", wrapped, True, True, True, False, True, False),
            ("LoRA, pool regions", wrapped, True, True, False, True, True, True),
            ("LoRA, module norms", wrapped, True, False, True, True, True, True),
            ("LoRA, peft forward (before)", wrapped, False, False, False, False, False, False)]
    samplers = {name: Sampler(model, tok) for name, model in (("plain", plain), ("LoRA", wrapped))}
    sampler_of = {name: samplers["plain" if model is plain else "LoRA"] for name, model, *_ in runs}

    def tokens_per_s(name):
        t = time.perf_counter()
        outs = sampler_of[name].generate(prompts, params)
        return sum(len(c.token_ids) for o in outs for c in o.completions) / (time.perf_counter() - t)

    print("sample: 4 x 8 x 64 forced tokens, bf16, tokens/s", flush=True)
    rates = _alternate({name: lambda sw=switches: _decode_paths(*sw) for name, _, *switches in runs}, repeats, tokens_per_s)
    plain_rate = statistics.median(rates["plain bf16 (now)"])
    _summary(rates, "tok/s", lambda med: f"{med / plain_rate:4.2f}x plain")


def bench_add(repeats: int) -> None:
    """One decoder layer's seven projections at 32 rows (SmolLM2's shapes, r = 16 on each), as
    the sampler's per-module bf16 decode computes them, on libgomp's team (native.openmp_regions):
    - plain: the bare model's path, every product W x^T and back into rows (csrc/transpose_bf16_cpu.cpp);
    - LoRA (now): the same products, the adapters of the modules that share an input added in one
      transposed call (q, k, v; gate, up; then o; down reading the MLP's inner activations as they
      lie);
    - LoRA, row-major adds (before): each module x W^T (F.linear) and its own row-major add.
    The LoRA excess is what a LoRA-wrapped policy pays per layer over the plain model."""
    from torch import nn

    from grpo_fast.models import cpu_ops, decode_fast_paths as dfp
    from grpo_fast.native import openmp_regions

    g = torch.Generator().manual_seed(0)
    H, I, KV, r, M = 576, 1536, 192, 16, 32
    shapes = {"q": (H, H), "k": (KV, H), "v": (KV, H), "o": (H, H), "gate": (I, H), "up": (I, H), "down": (H, I)}
    parts = {}
    for name, (n, k) in shapes.items():
        base = nn.Linear(k, n, bias=False).to(torch.bfloat16)
        with torch.no_grad():
            base.weight.copy_(torch.randn(n, k, generator=g) / k ** 0.5)
        terms = [(torch.randn(r, k, generator=g) / k ** 0.5, torch.randn(n, r, generator=g) / r ** 0.5, 2.0)]
        parts[name] = dfp.Parts(base, terms, torch.bfloat16, True, cpu_ops.lora_args(name, terms, k, n))
    plain = {name: p._replace(terms=[], mixed=None) for name, p in parts.items()}
    x = torch.randn(M, H, generator=g).bfloat16()
    into = torch.randn(M, H, generator=g).bfloat16()
    silu = torch.nn.functional.silu

    def transposed_layer(pp):
        xt = x.t()
        [dfp._rows(o) for o in dfp._transposed_many([pp["q"], pp["k"], pp["v"]], xt, x)]
        h = dfp._rows(dfp._transposed(pp["o"], xt, x))
        gate_t, up_t = dfp._transposed_many([pp["gate"], pp["up"]], xt, x)
        inner_t = silu(gate_t).mul_(up_t)
        return dfp._add_rows_(into.clone(), dfp._transposed(pp["down"], inner_t)), h

    def row_major_layer(pp):
        [dfp._mixed(x, pp[n]) for n in ("q", "k", "v")]
        h = dfp._mixed(x, pp["o"])
        inner = silu(dfp._mixed(x, pp["gate"])).mul_(dfp._mixed(x, pp["up"]))
        return into.clone().add_(dfp._mixed(inner, pp["down"])), h

    layers = {"plain": lambda: transposed_layer(plain), "LoRA (now)": lambda: transposed_layer(parts),
              "LoRA, row-major adds (before)": lambda: row_major_layer(parts)}

    def us(name):
        t = time.perf_counter()
        for _ in range(100):
            layers[name]()
        return (time.perf_counter() - t) / 100 * 1e6

    print("add: one layer's 7 projections at 32 rows, r = 16, bf16, us per layer (100 layers a figure)", flush=True)
    with torch.no_grad(), openmp_regions():
        times = _alternate({name: contextlib.nullcontext for name in layers}, repeats, us)
    base = statistics.median(times["plain"])
    _summary(times, "us", lambda med: f"LoRA excess {med - base:6.1f} us")


def _smollm2_bf16():
    """SmolLM2-135M in bf16, plain and LoRA-wrapped (r = 16 on every block linear, non-zero B; peft
    keeps the adapters fp32), a tokenizer and the sampler benchmark's prompts."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_fast.models import default_model_dir

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
    return plain, wrapped, tok, [p["input_ids"] if hasattr(p, "keys") else p for p in prompts]


def bench_packed(repeats: int) -> None:
    from grpo_fast.models.decode_fast_paths import FastPaths
    from grpo_fast.native import openmp_regions
    from grpo_fast.sampler import Sampler, SamplingParams

    plain, wrapped, tok, prompts = _smollm2_bf16()
    decoders = {"plain": plain.model, "LoRA": wrapped.base_model.model.model}
    M = 32
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, plain.config.hidden_size, generator=g).bfloat16()
    into = torch.randn(M, plain.config.hidden_size, generator=g).bfloat16()
    fast = FastPaths()

    def one_pass(layers):  # every layer's products in the decode's order
        for layer in layers:
            a = layer.self_attn
            fast.linears((a.q_proj, a.k_proj, a.v_proj), x)
            fast.gated_mlp_add_(fast.linear_add_(into.clone(), a.o_proj, x), layer.mlp, x)

    def stack(name):
        layers = decoders[name.split(",")[0]].layers
        with fast.scope():
            one_pass(layers)  # a scope's first pass packs the weights (or not): untimed
            t = time.perf_counter()
            one_pass(layers)  # the weights streamed from DRAM (212 MB of them do not stay in cache)
            return (time.perf_counter() - t) / len(layers) * 1e6

    names = ["plain, packed", "plain, W x^T", "LoRA, packed", "LoRA, W x^T"]
    switch = {n: (lambda packed=n.endswith("packed"): _decode_paths(True, True, packed=packed)) for n in names}
    print(f"packed: each decoder layer's 7 products at {M} rows, SmolLM2 bf16 (30 layers, weights from "
          "DRAM), r = 16, us per layer (the reorder not timed)", flush=True)
    with torch.no_grad(), openmp_regions():
        times = _alternate(switch, repeats, stack)
    _summary(times, "us", lambda med: "")

    params = SamplingParams(n=8, temperature=1.0, max_tokens=64, ignore_eos=True, seed=0)
    samplers = {"plain": Sampler(plain, tok), "LoRA": Sampler(wrapped, tok)}

    def tokens_per_s(name):
        t = time.perf_counter()
        outs = samplers[name.split(",")[0]].generate(prompts, params)
        return sum(len(c.token_ids) for o in outs for c in o.completions) / (time.perf_counter() - t)

    print("packed: the sampler, 4 x 8 x 64 forced tokens, bf16, tokens/s (each call's reorder included)", flush=True)
    rates = _alternate(switch, repeats, tokens_per_s)
    _summary(rates, "tok/s", lambda med: "")
    for model in ("plain", "LoRA"):
        p, w = (statistics.median(rates[f"{model}, {k}"]) for k in ("packed", "W x^T"))
        print(f"{model}: packed / W x^T tokens/s {p / w:.3f}")


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
def _decode_paths(native_add: bool, native_norms: bool, openmp: bool = True, transposed_adds: bool = True,
                  native_transposes: bool = True, packed: bool = True):
    """The decode's bf16 paths off or on for the duration: the native LoRA add (else peft's
    forward for the LoRA layers), the native bf16 RMSNorm (else the modules' ops), our kernels'
    regions on libgomp's team (else our own pool, the code before), a LoRA layer's products as
    W x^T with the transposed adds (else x W^T and the row-major add per module), the native
    bf16 transposes of those products back into rows (else torch's copy), and the products from
    oneDNN-packed weights (else the W x^T paths: GRPO_FAST_NO_PACKED_WEIGHTS=1)."""
    import os
    from grpo_fast.models import decode_fast_paths, llama_family
    from grpo_fast.sampler import model_runner

    fp = decode_fast_paths.FastPaths
    saved = (decode_fast_paths._fp32_over_bf16, llama_family.rms_norm, model_runner.openmp_regions,
             fp.__dict__["_transposable"], decode_fast_paths._rows, decode_fast_paths._add_rows_)
    if not native_add:
        decode_fast_paths._fp32_over_bf16 = lambda *_: False
    if not native_norms:
        llama_family.rms_norm = lambda norm, x: norm(x)
    if not openmp:
        model_runner.openmp_regions = lambda enabled=True: contextlib.nullcontext()
    if not transposed_adds:
        fp._transposable = staticmethod(lambda parts, x: False)
    if not native_transposes:
        decode_fast_paths._rows = lambda out_t: out_t.t().contiguous()
        decode_fast_paths._add_rows_ = lambda into, out_t: into.add_(out_t.t().contiguous())
    packing = os.environ.get("GRPO_FAST_NO_PACKED_WEIGHTS")
    if not packed:
        os.environ["GRPO_FAST_NO_PACKED_WEIGHTS"] = "1"
    try:
        yield
    finally:
        if packing is None:
            os.environ.pop("GRPO_FAST_NO_PACKED_WEIGHTS", None)
        else:
            os.environ["GRPO_FAST_NO_PACKED_WEIGHTS"] = packing
        (decode_fast_paths._fp32_over_bf16, llama_family.rms_norm, model_runner.openmp_regions, fp._transposable,
         decode_fast_paths._rows, decode_fast_paths._add_rows_) = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--only", choices=["train", "sample", "add", "packed"])
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
    if a.only in (None, "packed"):
        bench_packed(a.repeats)


if __name__ == "__main__":
    main()
