"""One switch of the GRPO step measured in one training run whose steps alternate it off and on,
so this VM's drift between minutes falls on both alike. Switches:

- release_memory: `train.release_memory` micro_batch (the default: malloc_trim after sampling and
  after every micro-batch's backward, each micro-batch then faulting its activations' pages in
  afresh, ~1.5 GiB of them at 8 x (40 + 128) tokens in fp32) or step (after sampling and once
  after the update; the micro-batches reuse each other's pages). Read the training phase.
- packed_weights: the bf16 decode's products from oneDNN-packed weights (decode_fast_paths,
  what runs by default) or the W x^T paths (GRPO_FAST_NO_PACKED_WEIGHTS=1). Read the sampling
  phase; use --dtype bfloat16.
- onednn_fp32: fp32 products on oneDNN (grpo_fast.onednn_gemm, what runs by default) or on MKL,
  torch's own choice (GRPO_FAST_NO_ONEDNN_FP32=1). fp32 only.

Prints every step's sampling and training time (the step less its sampling phase; the warm-up
step dropped) and the medians by setting. Peak resident sets need a process per setting:
`python benchmarks/bench_memory.py --configs long,long-step-release,bf16-long,bf16-long-step-release`.

    python benchmarks/bench_step_switch.py --switch release_memory [--steps 8] [--dtype float32|bfloat16]
    python benchmarks/bench_step_switch.py --switch packed_weights --dtype bfloat16
    python benchmarks/bench_step_switch.py --switch onednn_fp32 [--full-finetuning]

SmolLM2-135M + LoRA r = 16, B x G = 4 x 8, micro-batches of 8, 128 forced completion tokens.
Run it alone: it measures the machine as much as the code otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile


def _release_memory(cfg, on: bool) -> str:
    # the trainer reads train.release_memory after the update too, from this same object
    mode = "step" if on else "micro_batch"
    object.__setattr__(cfg.train, "release_memory", mode)
    return mode


def _off_switch(variable: str, names: tuple[str, str]):
    """A switch that sets `variable`=1 when off (a GRPO_FAST_NO_* read at call time); names: (off, on)."""

    def switch(cfg, on: bool) -> str:
        if on:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = "1"
        return names[on]

    return switch


SWITCHES = {"release_memory": _release_memory,
            "packed_weights": _off_switch("GRPO_FAST_NO_PACKED_WEIGHTS", ("W x^T", "packed")),
            "onednn_fp32": _off_switch("GRPO_FAST_NO_ONEDNN_FP32", ("MKL", "oneDNN"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--switch", choices=sorted(SWITCHES), default="release_memory")
    p.add_argument("--steps", type=int, default=8, help="measured steps (after one warm-up), alternating off and on")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--max-completion", type=int, default=128)
    p.add_argument("--full-finetuning", action="store_true", help="lora.enabled: false (every weight trains)")
    a = p.parse_args()

    from grpo_fast.config import DEFAULT_JOB, load_config
    from grpo_fast.sampler.sampler import Sampler
    from grpo_fast.train import rollout
    from grpo_fast.train.loop import train
    from grpo_fast.train.metrics import read_metrics

    generate = Sampler.generate  # every completion max_completion tokens (as bench_step --forced-length)
    Sampler.generate = lambda self, prompts, params, **kw: generate(
        self, prompts, dataclasses.replace(params, ignore_eos=True) if params.n > 1 else params, **kw)
    collect = rollout.collect_rollout
    settings: list[str] = []

    def switched(model, tokenizer, generator, stream, rewards, cfg, *args, **kw):  # set before the step's sampling
        settings.append(SWITCHES[a.switch](cfg, on=len(settings) % 2 == 1))
        return collect(model, tokenizer, generator, stream, rewards, cfg, *args, **kw)

    rollout.collect_rollout = switched
    out = tempfile.mkdtemp(prefix="bench_step_switch_")
    cfg = load_config(None, {
        "train.output_dir": out, "train.max_steps": a.steps + 1, "train.prompts_per_step": 4,
        "sampling.num_generations": 8, "sampling.max_completion_length": a.max_completion,
        "train.micro_batch_size": 8, "train.eval_before": False, "data.eval_size": 0, "train.progress": False,
        "train.time_budget_s": 0, "lora.r": 16, "lora.lora_alpha": 32, "train.seed": 0, "model.dtype": a.dtype,
        "lora.enabled": not a.full_finetuning,
    }, base=DEFAULT_JOB)
    train(cfg, echo=lambda *_: None)

    steps = [r for r in read_metrics(out) if "reward" in r]  # the step rows (no eval rows here)
    names = list(dict.fromkeys(settings))  # off, on
    sampling = {n: [] for n in names}
    training = {n: [] for n in names}
    print(f"\n{a.switch}: SmolLM2-135M {a.dtype}{', full fine-tuning' if a.full_finetuning else ''}, 4 x 8 x {a.max_completion} forced tokens, micro-batches of 8; "
          "step 1 is the warm-up")
    for i, (name, row) in enumerate(zip(settings, steps), start=1):
        s, t = row["time/sample_s"], row["time/step_s"] - row["time/sample_s"]
        print(f"step {i} {name:<11} step {row['time/step_s']:6.2f} s  sampling {s:5.2f} s  training {t:6.2f} s"
              f"{'  (warm-up)' if i == 1 else ''}")
        if i > 1:
            sampling[name].append(s)
            training[name].append(t)
    for name in names:
        print(f"{name:<11} medians: sampling {statistics.median(sampling[name]):5.2f} s, training "
              f"{statistics.median(training[name]):6.2f} s; every step's training: "
              f"{', '.join(f'{x:.2f}' for x in training[name])}")
    off, on = names
    for phase, values in (("sampling", sampling), ("training", training)):
        print(f"{on} / {off} {phase} time: {statistics.median(values[on]) / statistics.median(values[off]):.3f}")


if __name__ == "__main__":
    main()
