"""One GRPO step, ours vs TRL's GRPOTrainer: seconds per step (sampling and training apart) and
peak memory, on the same model, prompts, B × G, lengths, LoRA config and loss.

    python benchmarks/bench_step.py [--prompts 4 --generations 8 --max-completion 16 --steps 3]
    python benchmarks/bench_step.py --max-completion 128 --forced-length --prompt-len 1024 --busy python

Each implementation runs in its own subprocess (so peak RSS is its own); the first step is a
warm-up and not counted. Both sample at T = 1 with HF-free code paths of their own: ours uses the
trainer's generation adapter (paged Sampler when it supports the model, else HF generate), TRL
uses its default (transformers generate). Model: the built-in SmolLM2-135M-Instruct, fp32, CPU.
Needs the `bench` extra (trl; `pip install --no-deps trl==1.16.0 && pip install datasets`).
Writes benchmarks/results/bench_step-gc-{on,off}.json (other cases: the options in the name).

Data parallel: --nproc N runs our step twice on the same global batch, as one process with N
torch threads and as N torchrun ranks (gloo) with one thread each, and reports the ranks'
throughput relative to the one process (target >= 0.9x: the collectives cost little). Writes
benchmarks/results/bench_step-dp{N}.json.

    python benchmarks/bench_step.py --nproc 2 --prompts 4 --generations 8 --steps 3

Real GRPO lengths: --forced-length makes every completion exactly --max-completion tokens on both
sides (ours: ignore_eos, TRL: min_new_tokens), so both train on the same number of tokens;
--prompt-len P gives every prompt a system message of few-shot lines that brings it to ~P tokens
(the same text on both sides); --busy runs a competing process beside both sides
(benchmarks/_busy.py). Every step's time is printed, the warm-up included, so drift across steps
shows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _busy  # noqa: E402


def few_shot_system(tokenizer, question: str, target: int) -> str | None:
    """A system message of few-shot lines that brings [system, user: question] to ~target tokens
    under the chat template (None for target <= 0). Deterministic: both sides build the same."""
    if target <= 0:
        return None
    lines = []
    while True:
        text = "Examples:\n" + "\n".join(lines)
        msgs = [{"role": "system", "content": text}, {"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        if len(ids) >= target:
            return text
        k = len(lines) + 1
        lines.append(f"Q: what is {k * 37 % 101} + {k * 53 % 97}? A: {k * 37 % 101 + k * 53 % 97}.")


def _arithmetic_rows():
    from grpo_fast.tasks import make_task

    train_rows, _ = make_task("arithmetic", train_size=2000, eval_size=100, seed=1234)
    return train_rows


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_ours(a) -> dict:
    from grpo_fast.config import DEFAULT_JOB, load_config
    from grpo_fast.train.loop import train
    from grpo_fast.train.metrics import read_metrics

    out = tempfile.mkdtemp(prefix="bench_ours_")
    overrides = {
        "train.output_dir": out, "train.max_steps": a.steps + 1, "train.prompts_per_step": a.prompts,
        "sampling.num_generations": a.generations, "sampling.max_completion_length": a.max_completion,
        "train.eval_before": False, "data.eval_size": 0, "train.progress": False, "train.time_budget_s": 0,
        "lora.r": a.lora_r, "lora.lora_alpha": 2 * a.lora_r, "train.seed": 0, "sampling.backend": a.backend,
        "train.micro_batch_size": a.micro_batch, "model.gradient_checkpointing": a.gradient_checkpointing == "on",
        "train.num_threads": a.threads, "model.dtype": a.dtype, "train.release_memory": a.release_memory,
    }
    if a.prompt_len:
        from transformers import AutoTokenizer

        from grpo_fast.models import default_model_dir

        tok = AutoTokenizer.from_pretrained(default_model_dir())
        overrides["data.system_prompt"] = few_shot_system(tok, _arithmetic_rows()[0]["prompt"], a.prompt_len)
        overrides["sampling.max_prompt_length"] = a.prompt_len + 64
    if a.forced_length:  # every completion exactly max_completion tokens (TRL: min_new_tokens)
        import dataclasses

        from grpo_fast.sampler.sampler import Sampler

        real_generate = Sampler.generate
        Sampler.generate = lambda self, prompts, params, **kw: real_generate(
            self, prompts, dataclasses.replace(params, ignore_eos=True) if params.n > 1 else params, **kw)
    cfg = load_config(None, overrides, base=DEFAULT_JOB)
    train(cfg, echo=lambda *_: None)
    from grpo_fast import distributed

    if not distributed.is_main():  # under torchrun rank 0 alone logs (and reports) the step
        return None
    rows = [r for r in read_metrics(out) if "reward" in r]
    steps = rows[1:]  # drop the warm-up step
    sample = [r["time/sample_s"] for r in steps]
    total = [r["time/step_s"] for r in steps]
    return {"sample_s": sum(sample) / len(sample), "train_s": sum(t - s for t, s in zip(total, sample)) / len(total),
            "step_s": sum(total) / len(total), "completion_tokens": sum(r["completion_tokens"] for r in steps) / len(steps),
            "peak_rss_mib": _peak_rss_mib(), "per_step_s": [r["time/step_s"] for r in rows],
            "per_step_sample_s": [r["time/sample_s"] for r in rows]}


def run_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo_fast.models import default_model_dir
    from grpo_fast.rewards import accuracy
    from grpo_fast.tasks import make_task
    from grpo_fast.config import ModelConfig
    from grpo_fast.train.model import load_base_model, lora_targets

    folder = default_model_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    # Our loader drops the stale GGUF quantization_config of the converted folder (TRL refuses
    # to train a model marked GGUF-quantized); the weights are the same fp32 ones.
    model = load_base_model(ModelConfig(dtype=a.dtype), torch.device("cpu"))
    train_rows, _ = make_task("arithmetic", train_size=2000, eval_size=100, seed=1234)
    system = few_shot_system(tok, train_rows[0]["prompt"], a.prompt_len)
    head = [{"role": "system", "content": system}] if system else []
    ds = Dataset.from_list([{"prompt": head + [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                            for r in train_rows])

    def reward(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return accuracy(prompts, texts, answer)

    out = tempfile.mkdtemp(prefix="bench_trl_")
    args = GRPOConfig(
        # The same step in TRL's terms: micro-batches of `micro_batch` completions, accumulated over
        # one generation batch of B × G (steps_per_generation = gradient_accumulation_steps).
        output_dir=out, per_device_train_batch_size=a.micro_batch,
        gradient_accumulation_steps=a.prompts * a.generations // a.micro_batch,
        num_generations=a.generations, max_completion_length=a.max_completion, max_steps=a.steps + 1,
        learning_rate=1e-3, loss_type="dapo", beta=0.0, epsilon=0.2, epsilon_high=0.28, temperature=1.0,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0, bf16=a.dtype == "bfloat16",
        dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=a.gradient_checkpointing == "on",
        **({"generation_kwargs": {"min_new_tokens": a.max_completion}} if a.forced_length else {}),
        # TRL < 1.16 cuts prompts at max_prompt_length (512 by default); 1.16 dropped the field
        # and never truncates a prompt
        **({"max_prompt_length": a.prompt_len + 64}
           if a.prompt_len and "max_prompt_length" in {f.name for f in dataclasses.fields(GRPOConfig)} else {}))
    peft_cfg = LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0, target_modules=lora_targets(model),
                          task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=ds,
                          processing_class=tok, peft_config=peft_cfg)
    times = {"gen": [], "step": []}
    real = trainer._generate_and_score_completions

    def timed(*args_, **kw):
        t0 = time.perf_counter()
        try:
            return real(*args_, **kw)
        finally:
            times["gen"].append(time.perf_counter() - t0)

    trainer._generate_and_score_completions = timed

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            times["step"].append(time.perf_counter() - self.t0)
            print(f"trl step {len(times['step'])}: {times['step'][-1]:.1f} s (sampling {times['gen'][-1]:.1f} s)",
                  file=sys.stderr, flush=True)  # progress: a step beside a busy process can take many minutes

    trainer.add_callback(StepTimer())
    trainer.train()
    gen, step = times["gen"][1:], times["step"][1:]
    return {"sample_s": sum(gen) / len(gen), "train_s": sum(s - g for s, g in zip(step, gen)) / len(step),
            "step_s": sum(step) / len(step), "peak_rss_mib": _peak_rss_mib(), "per_step_s": times["step"],
            "per_step_sample_s": times["gen"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--max-completion", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=8, help="completions per forward/backward (both sides)")
    p.add_argument("--backend", default="sampler",
                   help="our generation backend: sampler (fails rather than fall back) | auto | hf")
    p.add_argument("--gradient-checkpointing", choices=["on", "off"], default="off",
                   help="both sides (off is our default, on is TRL's GRPOConfig default)")
    p.add_argument("--forced-length", action="store_true",
                   help="every completion exactly --max-completion tokens on both sides (ignore_eos / min_new_tokens)")
    p.add_argument("--prompt-len", type=int, default=0, help="bring each prompt to ~this many tokens (few-shot system)")
    p.add_argument("--busy", choices=_busy.KINDS, default="none", help="a competing process beside both sides")
    p.add_argument("--impl", choices=["ours", "trl", "trl_fused"], help=argparse.SUPPRESS)  # subprocess mode
    p.add_argument("--only", choices=["ours", "trl", "trl_fused"], help="run one side only")
    p.add_argument("--threads", type=int, default=0, help="our torch threads (0: torch's default)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="model weights on both sides (bfloat16: ours model.dtype, TRL bf16=True)")
    p.add_argument("--release-memory", default="micro_batch", choices=("micro_batch", "step"),
                   help="ours: train.release_memory (when freed heap pages go back to the OS)")
    p.add_argument("--nproc", type=int, default=0,
                   help="data parallel: N torchrun ranks x 1 thread vs 1 process x N threads (ours only)")
    p.add_argument("--trl-fused", action="store_true",
                   help="also TRL's GRPOTrainer with grpo-fast's fused loss (grpo_fast.integrations.trl)")
    a = p.parse_args()
    if (a.prompts * a.generations) % a.micro_batch:
        p.error("--micro-batch must divide prompts x generations")
    if a.impl:
        result = {"ours": run_ours, "trl": run_trl, "trl_fused": run_trl_fused}[a.impl](a)
        if result is not None:
            print("RESULT " + json.dumps(result))
        return
    if a.nproc:
        return data_parallel(a)

    results, failures = {}, {}
    for impl in [a.only] if a.only else ["ours", "trl"] + (["trl_fused"] if a.trl_fused else []):
        cmd = [sys.executable, __file__, "--impl", impl, "--prompts", str(a.prompts), "--generations",
               str(a.generations), "--max-completion", str(a.max_completion), "--steps", str(a.steps),
               "--lora-r", str(a.lora_r), "--backend", a.backend, "--micro-batch", str(a.micro_batch),
               "--gradient-checkpointing", a.gradient_checkpointing, "--prompt-len", str(a.prompt_len)]
        cmd += ["--forced-length"] if a.forced_length else []
        cmd += ["--dtype", a.dtype, "--release-memory", a.release_memory]
        with _busy.busy(a.busy):
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # its stderr (progress, errors) shows live
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            if proc.returncode == -9:
                why = "killed by signal 9 (SIGKILL: on Linux most often the kernel's out-of-memory killer; see dmesg)"
            elif proc.returncode < 0:
                why = f"killed by signal {-proc.returncode}"
            else:
                why = f"exit {proc.returncode}; its error is above"
            print(f"{impl} failed ({why})", file=sys.stderr)
            failures[impl] = why
            continue
        results[impl] = json.loads(line[-1][7:])

    print(f"\nGRPO step: B={a.prompts} x G={a.generations} (micro-batches of {a.micro_batch}), "
          f"max_completion={a.max_completion}{' (forced)' if a.forced_length else ''}, "
          f"prompts ~{a.prompt_len or 'natural'} tokens, LoRA r={a.lora_r}, gradient checkpointing "
          f"{a.gradient_checkpointing}, SmolLM2-135M {a.dtype}, CPU ({os.cpu_count()} cores), {_busy.describe(a.busy)}, "
          f"ours releasing freed memory per {a.release_memory}, "
          f"mean of {a.steps} steps after 1 warm-up")
    print(f"{'impl':<6} {'sample s':>9} {'train s':>9} {'step s':>9} {'peak RSS MiB':>13}  every step s (sampling s)")
    for impl, r in results.items():
        each = ", ".join(f"{t:.1f} ({g:.1f})" for t, g in zip(r.get("per_step_s", []), r.get("per_step_sample_s", [])))
        print(f"{impl:<6} {r['sample_s']:>9.2f} {r['train_s']:>9.2f} {r['step_s']:>9.2f} {r['peak_rss_mib']:>13.0f}  {each}")
    if "ours" in results and "trl" in results:
        o, t = results["ours"], results["trl"]
        print(f"ratio TRL/ours: step {t['step_s'] / o['step_s']:.2f}x, sampling {t['sample_s'] / o['sample_s']:.2f}x, "
              f"training {t['train_s'] / o['train_s']:.2f}x; peak RSS ours/TRL {o['peak_rss_mib'] / t['peak_rss_mib']:.2f}")
    if "trl" in results and "trl_fused" in results:
        t, f = results["trl"], results["trl_fused"]
        print(f"TRL with grpo-fast's fused loss / stock TRL: training {f['train_s'] / t['train_s']:.2f}x, "
              f"step {f['step_s'] / t['step_s']:.2f}x, peak RSS {f['peak_rss_mib'] / t['peak_rss_mib']:.2f}")
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    except OSError:
        commit = None
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("transformers", "peft", "trl"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    case = "".join([f"-c{a.max_completion}" if a.max_completion != 16 or a.forced_length else "",
                    "-forced" if a.forced_length else "", f"-p{a.prompt_len}" if a.prompt_len else "",
                    f"-mb{a.micro_batch}" if a.micro_batch != 8 else "", "-bf16" if a.dtype == "bfloat16" else "",
                    f"-busy-{a.busy}" if a.busy != "none" else "",
                    "-release-step" if a.release_memory == "step" else "", "-trl-fused" if a.trl_fused else "",
                    f"-only-{a.only}" if a.only else ""])  # a one-sided run keeps the two-sided file
    out = HERE / "results" / f"bench_step-gc-{a.gradient_checkpointing}{case}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "results": results, "failures": failures,
                               "device": f"cpu x{os.cpu_count()}",
                               "platform": platform.platform(), "versions": versions, "commit": commit,
                               "load_avg": os.getloadavg(), "beside": _busy.describe(a.busy)}, indent=2))
    print(f"wrote {out}")


def _ours_cmd(a, threads: int) -> list[str]:
    return [__file__, "--impl", "ours", "--prompts", str(a.prompts), "--generations", str(a.generations),
            "--max-completion", str(a.max_completion), "--steps", str(a.steps), "--lora-r", str(a.lora_r),
            "--backend", a.backend, "--micro-batch", str(a.micro_batch), "--gradient-checkpointing",
            a.gradient_checkpointing, "--prompt-len", str(a.prompt_len), "--threads", str(threads),
            "--dtype", a.dtype, "--release-memory", a.release_memory] + \
        (["--forced-length"] if a.forced_length else [])


def data_parallel(a) -> None:
    """--nproc N: our step as 1 process x N threads, then as N torchrun ranks x 1 thread, on the
    same global batch (B prompts x G); the ratio of their step times is the ranks' throughput."""
    if a.prompts % a.nproc:
        raise SystemExit(f"--prompts {a.prompts} must be a multiple of --nproc {a.nproc} (whole groups per rank)")
    runs = {f"1 proc x {a.nproc} threads": [sys.executable] + _ours_cmd(a, a.nproc),
            f"{a.nproc} ranks x 1 thread": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                            "--nproc-per-node", str(a.nproc)] + _ours_cmd(a, 1)}
    results = {}
    for name, cmd in runs.items():
        env = {**os.environ, "OMP_NUM_THREADS": str(a.nproc if "proc x" in name else 1), "CUDA_VISIBLE_DEVICES": ""}
        with _busy.busy(a.busy):
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[-1][7:])
    print(f"\nGRPO step, data parallel on the CPU: B={a.prompts} x G={a.generations}, max_completion="
          f"{a.max_completion}{' (forced)' if a.forced_length else ''}, LoRA r={a.lora_r}, backend {a.backend}, "
          f"SmolLM2-135M fp32, {os.cpu_count()} cores, {_busy.describe(a.busy)}, "
          f"mean of {a.steps} steps after 1 warm-up")
    print(f"{'run':<22} {'sample s':>9} {'train s':>9} {'step s':>9} {'tok/s':>8}  every step s (sampling s)")
    for name, r in results.items():
        each = ", ".join(f"{t:.1f} ({g:.1f})" for t, g in zip(r["per_step_s"], r["per_step_sample_s"]))
        print(f"{name:<22} {r['sample_s']:>9.2f} {r['train_s']:>9.2f} {r['step_s']:>9.2f} "
              f"{r['completion_tokens'] / r['step_s']:>8.1f}  {each}")
    one, ranks = results.values()
    ratio = one["step_s"] / ranks["step_s"]
    print(f"throughput {a.nproc} ranks / 1 process: {ratio:.2f}x (step time; the same global batch)")
    import torch

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    case = f"-c{a.max_completion}" if a.max_completion != 16 else ""
    out = HERE / "results" / f"bench_step-dp{a.nproc}{case}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "results": results, "throughput_ratio": ratio,
                               "device": f"cpu x{os.cpu_count()}", "platform": platform.platform(),
                               "versions": {"torch": torch.__version__, "python": platform.python_version()},
                               "commit": commit, "load_avg": os.getloadavg(), "beside": _busy.describe(a.busy)},
                              indent=2))
    print(f"wrote {out}")


def run_trl_fused(a) -> dict:
    """run_trl with grpo_fast.integrations.trl.FusedGRPOTrainer: TRL's GRPOTrainer, its loss computed by
    our fused op and everything else TRL's, so the difference to run_trl is the loss alone."""
    import trl

    from grpo_fast.integrations.trl import FusedGRPOTrainer

    stock = trl.GRPOTrainer
    trl.GRPOTrainer = FusedGRPOTrainer  # run_trl imports GRPOTrainer from trl when it runs
    try:
        return run_trl(a)
    finally:
        trl.GRPOTrainer = stock


if __name__ == "__main__":
    main()
