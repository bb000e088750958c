"""Group sampling throughput: grpo_fast.sampler vs HF `generate(num_return_sequences=G)`.

Same process, same model, same prompts, same sampling (T = 1, no top-k/top-p), every completion
forced to exactly `--new-tokens` tokens (ours: ignore_eos; HF: min_new_tokens), so both produce
B × G × C tokens. Reported per engine: generated tokens/s (best of --repeats, runs interleaved),
peak RSS growth (CPU) or peak allocated (CUDA) during the call, and KV memory (HF: the bytes of
its DynamicCache at the end; ours: the pool allocated and the blocks actually used at peak).

    python benchmarks/bench_sampler.py                       # CPU: 4 × 8 × 64, SmolLM2-135M fp32
    python benchmarks/bench_sampler.py --prompts 16 --new-tokens 512   # the GPU size
    python benchmarks/bench_sampler.py --preset qwen2.5-1.5b-random --dtype bfloat16 --prompts 16 \
        --new-tokens 512 --repeats 1 --engines hf,ours,ours-graphs     # the GPU check's run
    python benchmarks/bench_sampler.py --engines hf,ours,ours-lora,hf-lora --load none,python
                                                            # LoRA policy, idle and under load
    python benchmarks/bench_sampler.py --prompt-len 1024 --engines hf,ours,ours-nocascade
    python benchmarks/bench_sampler.py --dtype bfloat16 --engines ours,ours-fixedthreads --load none,python
                                                            # the thread governor beside a busy process

--preset builds a random-initialized model from a config (benchmarks/gpu_models.py: no download).
--engines: hf (HF generate), ours (our Sampler), ours-graphs (our Sampler with cuda_graphs=True,
CUDA only), ours-nocascade (cascade attention off), ours-fixedthreads (torch's thread count as it
is, not the load-following governor: the sampler before 7 Dec), ours-lora / hf-lora (the same model wrapped
in peft LoRA r = --lora-r on every block linear with non-zero B, as the trainer samples it).
--prompt-len P: each prompt gets a system message of few-shot lines that brings it to ~P tokens.
--load: conditions run one after the other, each with all engines: none (idle) or a competing
process (benchmarks/_busy.py: python, torch); the table gives each engine's share of its idle
tokens/s. Every engine also gets its share of the GEMM floor: the time the least linear work of
the run takes (LM head and adapters included; each distinct prompt-prefix token prefilled once,
then B x G x C decode tokens), each phase at the rate of the fastest of our native linear kernel,
torch's and oneDNN's at that phase's rows (decode: B x G; prefill: the prefix tokens, at most
1,024) on this model's base linears and LM head (gemm_rate), timed again before every repeat,
over the measured time (1.0 = nothing but GEMMs at those rates).
With --out the JSON is rewritten after every timed run, so a run cut short by a time limit still
leaves the engines it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_fast.models import default_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_utils as bu  # noqa: E402
import _busy  # noqa: E402
from grpo_fast.sampler import Sampler, SamplingParams

QUESTIONS = [
    "What is 12 + 7?", "Name three primary colors.", "Write a haiku about the sea.", "Why is the sky blue?",
    "What is the capital of France?", "Explain photosynthesis in one sentence.", "What is 9 times 8?",
    "Give me a synonym for happy.", "How many legs does a spider have?", "What is a prime number?",
    "Translate 'good morning' to Spanish.", "What does a thermometer measure?", "Name a mammal that can fly.",
    "What is 100 divided by 4?", "Who wrote Romeo and Juliet?", "What is the boiling point of water?",
]


class PeakMemory:
    """Peak memory growth over a block: CUDA peak allocated, or the kernel's RSS high-water mark
    (no polling thread: on a 2-core machine a poller steals time from the engine it measures)."""

    def __init__(self, device: torch.device):
        self.meter = bu.PeakMemory(device)
        self.peak = 0

    def __enter__(self):
        self.meter.reset()
        return self

    def __exit__(self, *exc):
        self.peak = max(0, self.meter.peak_above_baseline())


def run_hf(model, tok, prompts, G, C, seed):
    """Left-padded batch of prompts, expanded G times by generate itself."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    torch.manual_seed(seed)
    with PeakMemory(model.device) as mem:
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=C, min_new_tokens=C, num_return_sequences=G, pad_token_id=pad,
                             return_dict_in_generate=True)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    tokens = (out.sequences.shape[1] - width) * out.sequences.shape[0]
    cache = out.past_key_values
    kv_bytes = sum(
        t.numel() * t.element_size()
        for layer in getattr(cache, "layers", [])
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if isinstance(t, torch.Tensor)
    )
    return dict(tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds, peak_mem_bytes=mem.peak,
                kv_bytes=kv_bytes)


def run_ours(sampler, prompts, G, C, seed):
    params = SamplingParams(n=G, temperature=1.0, max_tokens=C, ignore_eos=True, seed=seed)
    with PeakMemory(sampler.runner.device) as mem:
        t = time.perf_counter()
        outs = sampler.generate(prompts, params)
        seconds = time.perf_counter() - t
    tokens = sum(len(c.token_ids) for o in outs for c in o.completions)
    s = sampler.stats
    per_block = s.kv_bytes // s.num_blocks
    return dict(tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds, peak_mem_bytes=mem.peak,
                kv_bytes=s.peak_blocks_used * per_block, kv_pool_bytes=s.kv_bytes, stats=s.as_dict())


ENGINES = ("hf", "ours", "ours-graphs", "ours-nocascade", "ours-fixedthreads", "ours-lora", "hf-lora")
KEYS = {"hf": "hf_generate", "ours": "grpo_fast", "ours-graphs": "grpo_fast_cuda_graphs",
        "ours-nocascade": "grpo_fast_no_cascade", "ours-fixedthreads": "grpo_fast_fixed_threads",
        "ours-lora": "grpo_fast_lora", "hf-lora": "hf_generate_lora"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_wrapped(args, device):
    """A second copy of the model wrapped in peft LoRA (r = args.lora_r on every block linear,
    random non-zero A and B: what the trainer samples from once training has moved B off 0)."""
    from peft import LoraConfig, get_peft_model

    model, _, _ = load_model(args, device)
    torch.manual_seed(0)
    cfg = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05, init_lora_weights=False,
                     target_modules=LORA_TARGETS)
    return get_peft_model(model, cfg).eval()


def padded_prompts(tok, questions, target: int) -> list[list[int]]:
    """Chat prompts brought to about `target` tokens by a system message of few-shot lines (what
    a long system prompt, few-shot examples or retrieved context look like to the sampler)."""
    prompts = []
    for q in questions:
        lines, k = [], 0
        while True:
            msgs = [{"role": "system", "content": "Examples:\n" + "\n".join(lines)}, {"role": "user", "content": q}]
            ids = _ids(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
            if len(ids) >= target or target <= 0:
                break
            k += 1
            lines.append(f"Q: what is {k * 37 % 101} + {k * 53 % 97}? A: {k * 37 % 101 + k * 53 % 97}.")
        prompts.append(ids)
    return prompts


def _ids(x) -> list[int]:
    return list(x["input_ids"] if hasattr(x, "keys") else x)


def distinct_prefix_tokens(prompts: list[list[int]]) -> int:
    """Tokens of the prompts' prefix tree: what an engine that computes each shared prefix once
    must prefill (sorted, each prompt shares with its predecessor the most any earlier prompt
    shares with it)."""
    ordered = sorted(map(list, prompts))
    shared = 0
    for a, b in zip(ordered, ordered[1:]):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        shared += n
    return sum(map(len, ordered)) - shared


def gemm_flops(model, prompts: list[list[int]], G: int, C: int) -> dict[str, float]:
    """FLOPs of the linear layers (block linears, LoRA adapters, LM head) of one generate, the
    least any engine must do: {"prefill": each distinct prompt-prefix token once (the LM head on
    the prompts' last tokens only), "decode": G x C tokens a prompt}."""
    from grpo_fast.models.llama_family import LlamaFamily

    fam = LlamaFamily(model)
    block = 0
    for m in fam.decoder.layers[0].modules():
        if isinstance(m, torch.nn.Linear):
            block += m.weight.numel()
    block *= len(fam.layers)
    head = fam.lm_head.weight.numel()
    decode_tokens = len(prompts) * G * C
    return {"prefill": 2.0 * (block * distinct_prefix_tokens(prompts) + head * len(prompts)),
            "decode": 2.0 * (block + head) * decode_tokens}


def gemm_rate(model, rows: int) -> float | None:
    """FLOP/s of the linear layers at `rows` rows, each weight at the rate of the fastest of our
    native kernel, torch's (MKL) and oneDNN's (grpo_fast.onednn_gemm) on it: every layer's block
    linears in turn and the LM head, so the weights stream from memory as in a forward; each
    weight's best of 3 passes after a warm one. None where the native kernel cannot run (CUDA,
    no AVX2). (It timed the MLP weights alone until 7 Dec: on AVX-512 tiles the down projection
    is the slowest shape, and the "floor" then read 1.2-1.5x below what the sampler did.)"""
    from grpo_fast import onednn_gemm
    from grpo_fast.models import cpu_ops
    from grpo_fast.models.llama_family import LlamaFamily

    fam = LlamaFamily(model)
    if fam.device.type != "cpu" or fam.dtype != torch.float32 or not cpu_ops.available():
        return None
    weights = [m.weight for layer in fam.layers for name, m in layer.named_modules()
               if type(m) is torch.nn.Linear and "lora_" not in name]  # the base layers, not the adapters
    weights.append(fam.lm_head.weight)
    xs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
    flops = sum(2.0 * rows * w.numel() for w in weights)
    kernels = [cpu_ops.linear, torch.nn.functional.linear] + ([onednn_gemm.linear] if onednn_gemm.available() else [])
    best = [float("inf")] * len(weights)
    with torch.no_grad():
        for linear in kernels:
            for rep in range(4):
                for i, w in enumerate(weights):
                    t = time.perf_counter()
                    linear(xs[w.shape[1]], w)
                    if rep:
                        best[i] = min(best[i], time.perf_counter() - t)
    return flops / sum(best)


def gemm_floor_seconds(flops: dict[str, float], prefill_rate: float, decode_rate: float) -> float:
    """Seconds the linear work takes at the GEMM rates of its two phases' row counts."""
    return flops["prefill"] / prefill_rate + flops["decode"] / decode_rate


def load_model(args, device):
    """(model, tokenizer, name): an HF folder, the default SmolLM2, or a random-init preset."""
    dtype = getattr(torch, args.dtype)
    if args.preset:
        from gpu_models import build_model_and_tokenizer

        model, tok = build_model_and_tokenizer(args.preset, device=device, dtype=dtype)
        return model, tok, f"{args.preset} (random init)"
    path = args.model or str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, tok, path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--preset", default=None, help="random-init model from benchmarks/gpu_models.py "
                    "(qwen2.5-1.5b-random, tiny-random) instead of --model")
    ap.add_argument("--engines", default="hf,ours", help=f"comma-separated, of {', '.join(ENGINES)}")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--prompt-len", type=int, default=0, help="bring each prompt to ~this many tokens (few-shot lines)")
    ap.add_argument("--lora-r", type=int, default=16, help="LoRA rank of the -lora engines")
    ap.add_argument("--load", default="none", help=f"conditions, comma-separated, of {', '.join(_busy.KINDS)}")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_sampler.json"))
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    loads = [x.strip() for x in args.load.split(",") if x.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        ap.error(f"--engines: any of {', '.join(ENGINES)}, got {args.engines!r}")
    if "ours-graphs" in engines and device.type != "cuda":
        ap.error("--engines: ours-graphs needs CUDA")
    if any(x not in _busy.KINDS for x in loads) or not loads:
        ap.error(f"--load: any of {', '.join(_busy.KINDS)}, got {args.load!r}")
    model, tok, path = load_model(args, device)
    lora_model = lora_wrapped(args, device) if any(e.endswith("-lora") for e in engines) else None
    questions = (QUESTIONS * (args.prompts // len(QUESTIONS) + 1))[: args.prompts]
    if args.prompt_len:
        prompts = padded_prompts(tok, questions, args.prompt_len)
    else:
        prompts = [_ids(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                tokenize=True)) for q in questions]
    G, C = args.group, args.new_tokens
    kv_tokens = args.prompts * G * (max(len(p) for p in prompts) + C) + 64 * 16
    samplers = {}
    for name in engines:
        if name.startswith("ours"):
            m = lora_model if name == "ours-lora" else model
            samplers[name] = Sampler(m, tok, kv_budget=f"{kv_tokens} tokens", cuda_graphs=name == "ours-graphs",
                                     cascade=name != "ours-nocascade", threads=name != "ours-fixedthreads")

    def run(name, prompts_, g, c, seed):
        if name.startswith("hf"):
            return run_hf(lora_model if name == "hf-lora" else model, tok, prompts_, g, c, seed)
        return run_ours(samplers[name], prompts_, g, c, seed)

    # Warm-up (allocator, thread pools, lazy inits) on a small run of each.
    for name in engines:
        run(name, prompts[:1], 2, 4, 0)
    rate = gemm_rate(model, args.prompts * G)  # a decode step's rows
    prefill_rows = min(1024, distinct_prefix_tokens(prompts))
    prefill_rate = gemm_rate(model, prefill_rows) if rate else None
    flops = {name: gemm_flops(lora_model if name.endswith("-lora") else model, prompts, G, C) for name in engines}
    load_before = os.getloadavg()
    by_load = {cond: {KEYS[name]: [] for name in engines} for cond in loads}
    results = by_load[loads[0]]
    record = dict(
        bench="sampler", device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        cpu_count=os.cpu_count(), threads=torch.get_num_threads(), loadavg_before=load_before,
        torch=torch.__version__, transformers=transformers.__version__, commit=_commit(), model=path, dtype=args.dtype,
        prompts=args.prompts, group=G, new_tokens=C, prompt_lens=[len(p) for p in prompts], results=results,
        lora_r=args.lora_r if lora_model is not None else None, loads={c: _busy.describe(c) for c in loads},
        results_by_load=by_load, gemm_rate_flops=rate, gemm_rate_prefill_flops=prefill_rate,
        gemm_prefill_rows=prefill_rows, gemm_flops={KEYS[n]: f for n, f in flops.items()},
    )
    for cond in loads:
        with _busy.busy(cond):
            for r in range(args.repeats):
                if rate and r:  # the floor's rates again, next to this repeat's runs: this VM's speed
                    # drifts by up to a third within minutes, and a floor timed once read above 1
                    rate, prefill_rate = gemm_rate(model, args.prompts * G), gemm_rate(model, prefill_rows)
                for name in engines:
                    res = run(name, prompts, G, C, seed=r)
                    if rate:
                        res["gemm_floor_share"] = gemm_floor_seconds(flops[name], prefill_rate, rate) / res["seconds"]
                        res["gemm_rate_flops"], res["gemm_rate_prefill_flops"] = rate, prefill_rate
                    by_load[cond][KEYS[name]].append(res)
                    _write(args.out, record)  # partial: what has run so far survives a time limit
    load_after = os.getloadavg()
    best_by = {c: {k: max(v, key=lambda x: x["tokens_per_s"]) for k, v in rs.items() if v} for c, rs in by_load.items()}
    best = best_by[loads[0]]
    hf_best = best.get("hf_generate")
    ratio = best["grpo_fast"]["tokens_per_s"] / hf_best["tokens_per_s"] if "grpo_fast" in best and hf_best else None
    ratios = {k: b["tokens_per_s"] / hf_best["tokens_per_s"] for k, b in best.items()
              if k != "hf_generate" and hf_best}

    mib = 2**20
    print(f"device={device} threads={torch.get_num_threads()} prompts={args.prompts} G={G} new_tokens={C} "
          f"prompt_lens={[len(p) for p in prompts]} loadavg before/after={load_before[0]:.1f}/{load_after[0]:.1f}"
          + (f" GEMM rate {rate / 1e9:.1f} GFLOPS at {args.prompts * G} rows, "
             f"{prefill_rate / 1e9:.1f} at {prefill_rows}" if rate else ""))
    for cond in loads:
        print(f"\n[{_busy.describe(cond)}]")
        print(f"{'engine':<24} {'tok/s':>8} {'runs tok/s':>22} {'of idle':>8} {'GEMM floor':>10} "
              f"{'peak mem MiB':>13} {'KV MiB':>8}")
        for name, runs in by_load[cond].items():
            if not runs:
                continue
            b = best_by[cond][name]
            idle = best_by[loads[0]].get(name)
            share = f"{b['tokens_per_s'] / idle['tokens_per_s']:.2f}" if idle else "-"
            floor = f"{b['gemm_floor_share']:.2f}" if "gemm_floor_share" in b else "-"
            print(f"{name:<24} {b['tokens_per_s']:8.1f} {str([round(x['tokens_per_s'], 1) for x in runs]):>22} "
                  f"{share:>8} {floor:>10} {b['peak_mem_bytes'] / mib:13.1f} {b['kv_bytes'] / mib:8.1f}")
    for name, r in ratios.items():
        extra = ""
        if "kv_pool_bytes" in best[name]:
            extra = (f"   (KV pool allocated: {best[name]['kv_pool_bytes'] / mib:.1f} MiB; "
                     f"blocks saved by sharing at peak: {best[name]['stats']['peak_blocks_saved_by_sharing']})")
        print(f"{name} / HF tokens/s: {r:.2f}x{extra}")
    pairs = [("grpo_fast_lora", "grpo_fast", "LoRA-wrapped / plain (ours)"),
             ("hf_generate_lora", "hf_generate", "LoRA-wrapped / plain (HF)"),
             ("grpo_fast", "grpo_fast_no_cascade", "cascade / no cascade (ours)")]
    for cond in loads:
        for a, b, label in pairs:
            if a in best_by[cond] and b in best_by[cond]:
                print(f"[{cond}] {label}: {best_by[cond][a]['tokens_per_s'] / best_by[cond][b]['tokens_per_s']:.2f}x")

    record.update(loadavg_after=load_after, ratio_tokens_per_s=ratio, ratios_vs_hf=ratios, complete=True)
    _write(args.out, record)
    print(f"wrote {args.out}")


def _commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _write(out, record):
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(path)


if __name__ == "__main__":
    main()
