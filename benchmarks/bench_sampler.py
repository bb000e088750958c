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

--preset builds a random-initialized model from a config (benchmarks/gpu_models.py: no download).
--engines: hf (HF generate), ours (our Sampler), ours-graphs (our Sampler with cuda_graphs=True,
CUDA only). With --out the JSON is rewritten after every timed run, so a run cut short by a time
limit still leaves the engines it finished.
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


ENGINES = ("hf", "ours", "ours-graphs")


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
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_sampler.json"))
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad or "hf" not in engines:
        ap.error(f"--engines: hf plus any of {', '.join(ENGINES)} (the ratios are against hf), got {args.engines!r}")
    if "ours-graphs" in engines and device.type != "cuda":
        ap.error("--engines: ours-graphs needs CUDA")
    model, tok, path = load_model(args, device)
    questions = (QUESTIONS * (args.prompts // len(QUESTIONS) + 1))[: args.prompts]
    prompts = []
    for q in questions:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    G, C = args.group, args.new_tokens
    kv_tokens = args.prompts * G * (max(len(p) for p in prompts) + C) + 64 * 16
    samplers = {name: Sampler(model, tok, kv_budget=f"{kv_tokens} tokens", cuda_graphs=name == "ours-graphs")
                for name in engines if name != "hf"}
    keys = {"hf": "hf_generate", "ours": "grpo_fast", "ours-graphs": "grpo_fast_cuda_graphs"}

    def run(name, prompts_, g, c, seed):
        if name == "hf":
            return run_hf(model, tok, prompts_, g, c, seed)
        return run_ours(samplers[name], prompts_, g, c, seed)

    # Warm-up (allocator, thread pools, lazy inits) on a small run of each.
    for name in engines:
        run(name, prompts[:1], 2, 4, 0)
    load_before = os.getloadavg()
    results = {keys[name]: [] for name in engines}
    record = dict(
        bench="sampler", device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        cpu_count=os.cpu_count(), threads=torch.get_num_threads(), loadavg_before=load_before,
        torch=torch.__version__, transformers=transformers.__version__, commit=_commit(), model=path, dtype=args.dtype,
        prompts=args.prompts, group=G, new_tokens=C, prompt_lens=[len(p) for p in prompts], results=results,
    )
    for r in range(args.repeats):
        for name in engines:
            results[keys[name]].append(run(name, prompts, G, C, seed=r))
            _write(args.out, record)  # partial: what has run so far survives a time limit
    load_after = os.getloadavg()
    best = {k: max(v, key=lambda x: x["tokens_per_s"]) for k, v in results.items()}
    ratio = best["grpo_fast"]["tokens_per_s"] / best["hf_generate"]["tokens_per_s"] if "grpo_fast" in best else None
    ratios = {k: b["tokens_per_s"] / best["hf_generate"]["tokens_per_s"] for k, b in best.items() if k != "hf_generate"}

    mib = 2**20
    print(f"device={device} threads={torch.get_num_threads()} prompts={args.prompts} G={G} new_tokens={C} "
          f"prompt_lens={[len(p) for p in prompts]} loadavg before/after={load_before[0]:.1f}/{load_after[0]:.1f}")
    print(f"{'engine':<22} {'tok/s':>8} {'runs tok/s':>18} {'peak mem MiB':>13} {'KV MiB':>8}")
    for name, runs in results.items():
        b = best[name]
        print(f"{name:<22} {b['tokens_per_s']:8.1f} {str([round(x['tokens_per_s'], 1) for x in runs]):>18} "
              f"{b['peak_mem_bytes'] / mib:13.1f} {b['kv_bytes'] / mib:8.1f}")
    for name, r in ratios.items():
        print(f"{name} / HF tokens/s: {r:.2f}x   (KV pool allocated: {best[name]['kv_pool_bytes'] / mib:.1f} MiB; "
              f"blocks saved by sharing at peak: {best[name]['stats']['peak_blocks_saved_by_sharing']})")

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
