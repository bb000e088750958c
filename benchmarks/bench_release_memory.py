"""When freed heap pages go back to the OS (`train.release_memory`), measured in one training run
whose steps alternate the two modes, so this VM's drift between minutes falls on both alike.

- micro_batch (the default): malloc_trim after sampling and after every micro-batch's backward;
  each micro-batch then faults its activations' pages in afresh (~1.5 GiB of them at 8 x (40 +
  128) tokens in fp32);
- step: after sampling and once after the update; the micro-batches reuse each other's pages.

Prints every step's training time (the step less its sampling phase; the warm-up step dropped)
and the medians. Peak resident sets need a process per mode: `python benchmarks/bench_memory.py
--configs long,long-step-release,bf16-long,bf16-long-step-release`.

    python benchmarks/bench_release_memory.py [--steps 8] [--dtype float32|bfloat16]

SmolLM2-135M + LoRA r = 16, B x G = 4 x 8, micro-batches of 8, 128 forced completion tokens.
Run it alone: it measures the machine as much as the code otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

MODES = ("micro_batch", "step")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="measured steps (after one warm-up), alternating the modes")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--max-completion", type=int, default=128)
    a = p.parse_args()

    import grpo_fast.trainer as trainer
    from grpo_fast.config import DEFAULT_JOB, load_config
    from grpo_fast.sampler.sampler import Sampler
    from grpo_fast.train.loop import train
    from grpo_fast.train.metrics import read_metrics

    generate = Sampler.generate  # every completion max_completion tokens (as bench_step --forced-length)
    Sampler.generate = lambda self, prompts, params, **kw: generate(
        self, prompts, dataclasses.replace(params, ignore_eos=True) if params.n > 1 else params, **kw)
    update = trainer.update_policy
    modes: list[str] = []

    def alternating(policy, optimizer, scheduler, params, rollout, cfg, *args, **kw):
        mode = MODES[len(modes) % 2]
        # the trainer reads train.release_memory after the update too, from this same object
        object.__setattr__(cfg.train, "release_memory", mode)
        modes.append(mode)
        t = time.perf_counter()
        out = update(policy, optimizer, scheduler, params, rollout, cfg, *args, **kw)
        print(f"update {len(modes)} ({mode}): {time.perf_counter() - t:.2f} s", flush=True)
        return out

    trainer.update_policy = alternating
    out = tempfile.mkdtemp(prefix="bench_release_memory_")
    cfg = load_config(None, {
        "train.output_dir": out, "train.max_steps": a.steps + 1, "train.prompts_per_step": 4,
        "sampling.num_generations": 8, "sampling.max_completion_length": a.max_completion,
        "train.micro_batch_size": 8, "train.eval_before": False, "data.eval_size": 0, "train.progress": False,
        "train.time_budget_s": 0, "lora.r": 16, "lora.lora_alpha": 32, "train.seed": 0, "model.dtype": a.dtype,
    }, base=DEFAULT_JOB)
    train(cfg, echo=lambda *_: None)

    training: dict[str, list[float]] = {m: [] for m in MODES}
    print(f"\nSmolLM2-135M {a.dtype}, 4 x 8 x {a.max_completion} forced tokens, micro-batches of 8; step 1 is the warm-up")
    steps = [r for r in read_metrics(out) if "reward" in r]  # the step rows (no eval rows here)
    for i, (mode, row) in enumerate(zip(modes, steps), start=1):
        t = row["time/step_s"] - row["time/sample_s"]
        print(f"step {i} {mode:<11} step {row['time/step_s']:6.2f} s  sampling {row['time/sample_s']:5.2f} s  "
              f"training {t:6.2f} s{'  (warm-up)' if i == 1 else ''}")
        if i > 1:
            training[mode].append(t)
    med = {m: statistics.median(v) for m, v in training.items()}
    for m in MODES:
        print(f"{m:<11} training median {med[m]:6.2f} s  every step: {', '.join(f'{x:.2f}' for x in training[m])}")
    print(f"step / micro_batch training time: {med['step'] / med['micro_batch']:.3f}")


if __name__ == "__main__":
    main()
