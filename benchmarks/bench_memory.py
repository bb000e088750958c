"""The memory plan against measured peaks, per phase, on the CPU.

Each config runs in its own process: import, build the trainer, take `--steps` GRPO steps (every
completion forced to max_completion_length, the plan's worst case) with
the kernel's resident-set high-water mark reset (/proc/self/clear_refs) before each phase and
read (VmHWM) after it. Reported per phase: the plan's predicted peak and the measured one, both
as bytes above the process's baseline (its resident set after the imports, before the model:
the plan's `runtime`), and their ratio.

    python benchmarks/bench_memory.py                  # every config below
    python benchmarks/bench_memory.py --configs base,long --steps 2
    python benchmarks/bench_memory.py --paper        # the plan alone: Llama-3.1-8B QLoRA, G = 8, 24 GiB

Writes benchmarks/results/bench_memory-cpu-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _bench_utils as bu  # noqa: E402

BASE = {"train.prompts_per_step": 4, "sampling.num_generations": 8, "sampling.max_completion_length": 16,
        "train.micro_batch_size": 8, "lora.r": 16, "lora.lora_alpha": 32, "train.eval_before": False,
        "data.eval_size": 0, "train.progress": False, "train.report_to": "none", "train.save_steps": 0,
        "sampling.max_prompt_length": 64, "rewards.funcs": "accuracy"}
PROMPT_LEN = "prompt_len"  # not a config field: bring every prompt to ~this many tokens
CONFIGS = {
    "base": {},
    "long": {"sampling.max_completion_length": 128, "train.prompts_per_step": 2},
    "big-batch": {"train.micro_batch_size": 32, "train.prompts_per_step": 4},
    "g16": {"sampling.num_generations": 16, "train.prompts_per_step": 2, "train.micro_batch_size": 16},
    "checkpointing": {"model.gradient_checkpointing": True, "sampling.max_completion_length": 64},
    "beta-mu2": {"loss.beta": 0.04, "loss.num_iterations": 2},
    "4bit": {"model.load_in_4bit": True, "sampling.max_completion_length": 64},
    # bf16 weights and activations, fp32 adapters, SDPA's saved tensors in fp32 (fp32_attention)
    "bf16": {"model.dtype": "bfloat16"},
    "bf16-long": {"model.dtype": "bfloat16", "sampling.max_completion_length": 128, "train.prompts_per_step": 2},
    # freed heap pages handed back once a step instead of after every micro-batch (faster, more held)
    "long-step-release": {"sampling.max_completion_length": 128, "train.prompts_per_step": 2,
                          "train.release_memory": "step"},
    "bf16-long-step-release": {"model.dtype": "bfloat16", "sampling.max_completion_length": 128,
                               "train.prompts_per_step": 2, "train.release_memory": "step"},
    "bf16-checkpointing": {"model.dtype": "bfloat16", "model.gradient_checkpointing": True,
                           "sampling.max_completion_length": 64},
    "full-ft": {"lora.enabled": False, "loss.beta": 0.04},  # every weight trains, a frozen reference copy
    "long-192": {"sampling.max_completion_length": 192, "train.prompts_per_step": 2},
    # both sizes from the plan under a 2.5 GiB limit on the whole process: the run must stay inside it
    "auto-2.5GiB": {"sampling.max_completion_length": 128, "train.micro_batch_size": 0,
                    "train.micro_batch_tokens": "auto", "sampling.kv_budget": "auto"},
    # ~1,024-token prompts (bench_step.py's few-shot system message), 128 tokens: the cached
    # training layout with whole groups (8), and the group prompts of micro-batches of 2
    "p1024-mb8": {"sampling.max_completion_length": 128, PROMPT_LEN: 1024},
    "p1024-mb2": {"sampling.max_completion_length": 128, "train.micro_batch_size": 2, PROMPT_LEN: 1024},
}
LIMITS = {"auto-2.5GiB": "2.5GiB"}  # GRPO_FAST_MEMORY_LIMIT for the config


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def run_one(name: str, steps: int) -> dict:
    """In a subprocess: one config's measured and predicted peaks."""
    import torch  # noqa: F401  (the baseline: the runtime the plan calls `runtime`)
    import transformers  # noqa: F401
    import peft  # noqa: F401

    from grpo_fast import memory, trainer
    from grpo_fast.config import DEFAULT_JOB, load_config
    from grpo_fast.train import rollout, update
    from grpo_fast.train.memory import release_free_memory

    out = tempfile.mkdtemp(prefix="bench_memory_")
    overrides = {**BASE, **CONFIGS[name], "train.output_dir": out, "train.max_steps": steps}
    prompt_len = overrides.pop(PROMPT_LEN, 0)
    if prompt_len:  # the system message is built before the baseline: its tokenizer is not the run's
        from bench_step import _arithmetic_rows, few_shot_system

        from grpo_fast.train.model import load_tokenizer

        tok = load_tokenizer(load_config(None, {}, base=DEFAULT_JOB).model)
        overrides["data.system_prompt"] = few_shot_system(tok, _arithmetic_rows()[0]["prompt"], prompt_len)
        overrides["sampling.max_prompt_length"] = prompt_len + 64
        del tok
    release_free_memory()
    baseline = _status("VmRSS")
    cfg = load_config(None, overrides, base=DEFAULT_JOB)
    measured: dict[str, int] = {}

    def phase(label, fn):
        def wrapped(*a, **k):
            release_free_memory()
            _reset_peak()
            try:
                return fn(*a, **k)
            finally:
                measured[label] = max(measured.get(label, 0), _status("VmHWM") - baseline)
        return wrapped

    # Every completion runs to max_completion_length (no EOS stop): the plan is the worst case,
    # so it is measured there.
    import functools

    from grpo_fast.train import generation

    generation.SamplingParams = functools.partial(generation.SamplingParams, ignore_eos=True)
    rollout.collect_rollout = phase("sampling", rollout.collect_rollout)
    update.score_logprobs = phase("scoring", update.score_logprobs)
    update.optimizer_update = phase("training", update.optimizer_update)
    t = trainer.GRPOTrainer(args=cfg, echo=lambda *_: None)
    longest = max(len(e.ids) for e in t.stream.items)
    predicted = memory.plan(cfg, t.capacity, prompt_tokens=longest)  # the plan for the prompts this run has
    t.train()
    plan_above = {k: v - predicted.components["runtime"] for k, v in predicted.phases.items()}
    return {"config": name, "overrides": CONFIGS[name], "baseline_bytes": baseline, "measured": measured,
            "predicted": plan_above, "components": predicted.components, "longest_prompt": longest,
            "limit_bytes": t.capacity, "micro_batch_tokens": t.micro_batch_tokens,
            "peak_total_bytes": baseline + max(measured.values())}


# Llama-3.1-8B's config.json, the fields the plan reads (no download).
LLAMA_31_8B = dict(vocab=128256, hidden=4096, intermediate=14336, layers=32, q_heads=32, kv_heads=8, head_dim=128,
                   tied=False)


def paper(device_memory: int = 24 * 2**30) -> list[list[str]]:
    """The plan for Llama-3.1-8B QLoRA (NF4, LoRA r = 16 on every block linear, gradient
    checkpointing, 8-bit AdamW), one prompt x G = 8 per step, 1,024-token prompts, on a CUDA card
    of `device_memory`, at 4K and 20K context (prompt + completion), with kv_budget and
    micro_batch_tokens both auto."""
    from grpo_fast import memory
    from grpo_fast.config import load_config

    shape = memory.ModelShape(**LLAMA_31_8B)
    rows = []
    for context in (4096, 20480):
        cfg = load_config(None, {"model.device": "cuda", "model.load_in_4bit": True, "model.gradient_checkpointing": True,
                                 "model.dtype": "bfloat16", "lora.r": 16, "lora.lora_alpha": 32,
                                 "train.optim": "adamw_8bit", "train.prompts_per_step": 1,
                                 "sampling.num_generations": 8, "sampling.max_prompt_length": 1024,
                                 "sampling.max_completion_length": context - 1024, "sampling.kv_budget": "auto",
                                 "train.micro_batch_tokens": "auto"})
        p = memory.plan(cfg, device_memory, shape=shape)
        print(f"--- Llama-3.1-8B QLoRA, G = 8, {context} context, {device_memory / 2**30:.0f} GiB card\n{p.table()}\n")
        c = p.components
        rows.append([f"{context}", f"{p.peak_bytes / 2**30:.1f}", f"{p.phases['sampling'] / 2**30:.1f}",
                     f"{p.phases['training'] / 2**30:.1f}", f"{c['weights'] / 2**30:.1f}", f"{c['kv cache'] / 2**30:.1f}",
                     f"{c['training activations'] / 2**30:.1f}", "yes" if p.fits(device_memory) else "no"])
    print(bu.format_table(["context", "peak GiB", "sampling", "training", "weights", "KV pool", "activations",
                           "fits"], rows))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # subprocess mode
    ap.add_argument("--paper", action="store_true", help="print the plan for Llama-3.1-8B QLoRA on a 24 GiB card")
    a = ap.parse_args()
    if a.paper:
        paper()
        return
    if a.one:
        print("RESULT " + json.dumps(run_one(a.one, a.steps)))
        return
    results = []
    for name in a.configs.split(","):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if name in LIMITS:
            env["GRPO_FAST_MEMORY_LIMIT"] = LIMITS[name]
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(a.steps)],
                              capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(line[len("RESULT "):])
        results.append(r)
        if r["limit_bytes"]:
            print(f"{name:<14} limit {r['limit_bytes'] / 2**20:.0f} MiB, micro_batch_tokens {r['micro_batch_tokens']}: "
                  f"peak resident set {r['peak_total_bytes'] / 2**20:.0f} MiB", flush=True)
        for ph, got in r["measured"].items():
            want = r["predicted"].get(ph)
            ratio = want / got if want and got else float("nan")
            print(f"{name:<14} {ph:<9} predicted {want / 2**20:8.1f} MiB  measured {got / 2**20:8.1f} MiB  "
                  f"predicted/measured {ratio:5.2f}", flush=True)
    rows = [[r["config"], ph, f"{r['predicted'].get(ph, 0) / 2**20:.1f}", f"{got / 2**20:.1f}",
             f"{r['predicted'].get(ph, 0) / got:.2f}" if got else "-"]
            for r in results for ph, got in r["measured"].items()]
    print(bu.format_table(["config", "phase", "predicted MiB", "measured MiB", "pred/meas"], rows))
    import torch

    path = bu.write_results("bench_memory", {"results": results, "steps": a.steps,
                                             "env": bu.environment(torch.device("cpu"))})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
