"""Fused GRPO loss, forward + backward: naive PyTorch vs Liger-Kernel vs grpo-fast.

Each implementation runs in its own subprocess on the same seeded inputs, so peak memory is
measured cleanly: RSS above the inputs on CPU (kernel high-water mark, with malloc's mmap
threshold fixed so freed blocks leave the RSS: `_bench_utils.WORKER_ENV`), max_memory_allocated
above the inputs on CUDA. The LM head is frozen (the QLoRA case): gradient to hidden only.

    naive  grpo_fast.loss.reference_grpo_loss: materializes [N, V] fp32 logits and log-softmax
    liger  liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss (pip install liger-kernel; the
           `bench` extra), compiled=False: torch.compile only wraps its [B, T] loss math, and on
           CPU its compile time would land in the warm-up
    ours   grpo_fast.ops.fused_grpo_loss (cpu backend on CPU tensors, triton on CUDA)
    ours-entropy    the same with the 80/20 high-entropy mask (top_entropy_quantile 0.2, the
           step's threshold given as the trainer gives it) and the entropy bonus (entropy_coef
           0.01): the entropy's gradient through the fused head
    ours-recompute  the same with the frozen-head gradient recomputed in the backward (opt-in)

Loss: dapo, beta = 0.04 (with reference log-probs), old log-probs given, ε = (0.2, 0.28),
sequences of 512 completion tokens, mask all ones (N = number of tokens). dtype: fp32 on CPU
(the CPU training path runs fp32; bf16 matmuls on an AVX2 CPU are ~5x slower than fp32), bf16 on
CUDA.

    python benchmarks/bench_loss.py                      # all configs, all implementations
    python benchmarks/bench_loss.py --configs 2048x576x49152 --impls naive,ours --reps 2
    python benchmarks/bench_loss.py --configs 8192x576x49152,8192x1536x151936 --impls naive,ours,liger \
        --out gpu.json                                   # the GPU check's run (bf16 on CUDA)

--out PATH writes the JSON there instead of benchmarks/results/, rewritten after every run so a
time limit still leaves the runs that finished.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_utils as bu  # noqa: E402

CONFIGS = ["2048x576x49152", "8192x576x49152", "2048x1536x151936"]  # N x H x V
IMPLS = ["naive", "liger", "ours"]
SEQ_LEN = 512
# use_bias_correction_kl=False: the plain k3 KL, as Liger computes it (TRL 1.16's and our default is
# the bias-corrected one, the same cost), so that every implementation computes the same loss.
LOSS = dict(loss_type="dapo", beta=0.04, epsilon_low=0.2, epsilon_high=0.28, temperature=1.0,
            use_bias_correction_kl=False)
ENTROPY_OPTIONS = dict(top_entropy_quantile=0.2, entropy_coef=0.01)  # ours-entropy


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device):
    """Seeded inputs, identical in every worker. old/ref log-probs are synthetic (around -log V):
    no implementation's cost depends on their values."""
    if n % SEQ_LEN:
        raise ValueError(f"N={n} must be a multiple of {SEQ_LEN}")
    g = torch.Generator().manual_seed(0)
    b = n // SEQ_LEN
    hidden = torch.randn(b, SEQ_LEN, h, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / math.sqrt(h)).to(device=device, dtype=dtype)  # frozen
    targets = torch.randint(0, v, (b, SEQ_LEN), generator=g).to(device)
    mask = torch.ones(b, SEQ_LEN, device=device)
    adv = torch.randn(b, generator=g).to(device)
    base = -math.log(v)
    old = (base + 0.5 * torch.randn(b, SEQ_LEN, generator=g)).to(device)
    ref = (base + 0.5 * torch.randn(b, SEQ_LEN, generator=g)).to(device)
    return hidden, weight, targets, mask, adv, old, ref


def make_step(impl: str, hidden, weight, targets, mask, adv, old, ref):
    """A closure running one forward + backward; returns the loss."""
    if impl == "naive":
        from grpo_fast.loss import reference_grpo_loss

        def loss_fn():
            return reference_grpo_loss(hidden, weight, targets, mask, adv, old, ref, **LOSS)[0]
    elif impl in ("ours", "ours-recompute", "ours-entropy"):
        from grpo_fast.loss import logprob_function
        from grpo_fast.ops import fused_grpo_loss

        # ours-recompute: the backward recomputes the logits (3 matmuls) instead of the
        # gradient-ready forward (2); kept to back the choice with a measurement.
        logprob_function.USE_GRADIENT_READY_FORWARD = impl != "ours-recompute"
        options = dict(LOSS)
        if impl == "ours-entropy":
            options.update(ENTROPY_OPTIONS, **step_entropy(hidden, weight, targets, mask))

        def loss_fn():
            return fused_grpo_loss(hidden, weight, targets, mask, adv, old, ref, **options)[0]
    elif impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        # (Liger takes no use_bias_correction_kl: its KL is the plain k3 one)

        module = LigerFusedLinearGRPOLoss(
            beta=LOSS["beta"], compiled=False, use_ref_model=True, loss_type=LOSS["loss_type"],
            epsilon_low=LOSS["epsilon_low"], epsilon_high=LOSS["epsilon_high"],
            temperature=LOSS["temperature"], max_completion_length=SEQ_LEN)

        def loss_fn():
            return module(hidden, weight, targets, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)[0]
    else:
        raise ValueError(f"unknown impl {impl!r}")

    def step():
        hidden.grad = None
        loss = loss_fn()
        loss.backward()
        return loss

    return step


def step_entropy(hidden, weight, targets, mask) -> dict:
    """The step-global entropy threshold and kept-token count, as the trainer computes them from its
    scoring pass (outside the timed loss: the trainer has these log-probs' pass anyway when
    num_iterations > 1; with num_iterations = 1 it is one forward without gradient more)."""
    from grpo_fast.loss.objective import entropy_threshold
    from grpo_fast.ops import selective_logprobs

    _, ent = selective_logprobs(hidden.detach(), weight, targets, temperature=LOSS["temperature"],
                                return_entropy=True)
    thr = entropy_threshold(ent, mask, ENTROPY_OPTIONS["top_entropy_quantile"])
    return dict(entropy_threshold=thr, num_entropy_items_in_batch=float(((ent >= thr) & (mask != 0)).sum()))


def worker(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    n, h, v = (int(x) for x in args.config.split("x"))
    inputs = make_inputs(n, h, v, dtype, device)
    step = make_step(args.impl, *inputs)  # imports happen before the baseline
    mem = bu.PeakMemory(device)
    mem.reset()
    times, cpu = bu.time_reps(step, device, args.warmup, args.reps)
    peak = mem.peak_above_baseline()
    loss = step().item()
    grad = inputs[0].grad.float()
    return {"times_s": times, "median_s": bu.median(times), "cpu_s": cpu, "median_cpu_s": bu.median(cpu),
            "peak_bytes": peak, "loss": loss,
            "grad_norm": grad.norm().item(), "weight_grad": inputs[1].grad is not None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated NxHxV")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"of {IMPLS + ['ours-entropy', 'ours-recompute']}")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", default=None, help="write the results JSON here (after every run)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.worker:
        print(json.dumps(worker(args)))
        return

    device = torch.device(args.device)
    runs = []
    payload = {"env": bu.environment(device), "command": " ".join([Path(sys.executable).name] + sys.argv),
               "dtype": args.dtype, "loss": LOSS, "entropy_options": ENTROPY_OPTIONS, "seq_len": SEQ_LEN, "reps": args.reps, "warmup": args.warmup,
               "runs": runs}
    for config in args.configs.split(","):
        for impl in args.impls.split(","):
            load_before = bu.load_average()
            t0 = time.time()
            res = bu.run_worker(__file__, ["--impl", impl, "--config", config, "--device", args.device,
                                           "--dtype", args.dtype, "--reps", str(args.reps),
                                           "--warmup", str(args.warmup)], args.timeout)
            res.update(config=config, impl=impl, load_before=load_before, load_after=bu.load_average(),
                       wall_s=time.time() - t0)
            runs.append(res)
            print(f"  {config} {impl}: " + (f"error {res['error']}" if "error" in res else
                  f"{res['median_s']:.2f} s (CPU {res['median_cpu_s']:.2f} s), {res['peak_bytes'] / 2**20:.0f} MiB, "
                  f"loss {res['loss']:.6f}, "
                  f"load {load_before[0]:.1f}->{res['load_after'][0]:.1f}"), flush=True)
            if args.out:
                _write_json(args.out, payload)

    rows, checks = [], []
    for config in args.configs.split(","):
        by = {r["impl"]: r for r in runs if r["config"] == config and "error" not in r}
        naive = by.get("naive")
        for impl, r in by.items():
            t_ratio = f"{r['median_s'] / naive['median_s']:.2f}" if naive else "-"
            c_ratio = f"{r['median_cpu_s'] / naive['median_cpu_s']:.2f}" if naive else "-"
            m_ratio = f"{r['peak_bytes'] / naive['peak_bytes']:.3f}" if naive and naive["peak_bytes"] > 0 else "-"
            rows.append([config, impl, f"{r['median_s']:.2f}", f"{min(r['times_s']):.2f}", t_ratio,
                         f"{r['median_cpu_s']:.2f}", c_ratio, f"{r['peak_bytes'] / 2**20:.0f}", m_ratio,
                         f"{r['loss']:.6f}", f"{r['load_before'][0]:.1f}-{r['load_after'][0]:.1f}"])
        ours, liger = by.get("ours"), by.get("liger")
        if ours and by.get("ours-entropy"):
            checks.append((config, "ours-entropy time <= 1.15x ours",
                           by["ours-entropy"]["median_s"] <= 1.15 * ours["median_s"]))
        if ours and naive:
            checks.append((config, "memory <= 0.1x naive", ours["peak_bytes"] <= 0.1 * naive["peak_bytes"]))
            checks.append((config, "time <= 0.6x naive", ours["median_s"] <= 0.6 * naive["median_s"]))
        if ours and liger:
            checks.append((config, "time <= 0.8x liger", ours["median_s"] <= 0.8 * liger["median_s"]))
            checks.append((config, "memory <= liger", ours["peak_bytes"] <= liger["peak_bytes"]))
    env = payload["env"]
    print(f"\nFused GRPO loss fwd+bwd, frozen head, {args.dtype}, {env['device']}")
    print(bu.format_table(["N x H x V", "impl", "median s", "min s", "time/naive", "CPU s", "CPU/naive",
                           "peak MiB", "mem/naive", "loss", "load"], rows))
    for config, what, ok in checks:
        print(f"  {config}: {what}: {'yes' if ok else 'NO'}")
    payload.update(checks=[{"config": c, "check": w, "ok": ok} for c, w, ok in checks], complete=True)
    path = _write_json(args.out, payload) if args.out else bu.write_results("bench_loss", payload)
    print(f"results: {path}")


def _write_json(out: str, payload: dict) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
    return path


if __name__ == "__main__":
    main()
