"""The training pass's lean LoRA (grpo_fast/lean_lora.py: the adapter term added inside one addmm),
native SwiGLU (csrc/swiglu_cpu.cpp: silu(gate) * up forward and backward in one pass each) and
native RMSNorm (grpo_fast/rms_norm.py: one pass per row each way), each against what ran before
(peft's forward; PyTorch's tensor ops; HF's module), interleaved in one process.

1. ops: forward + backward of one op at SmolLM2-135M's shapes over 1,016 rows (8 completions of
   127 tokens), r = 16, median of --repeats runs (every run printed):
   - silu_mul over [1016, 1536];
   - SmolLM2's RMSNorm over [1016, 576];
   - a LoRA linear for each projection shape (576 -> 1536, 1536 -> 576, 576 -> 576, 576 -> 192).
2. step: forward + backward of `completion_hidden` over B x G = 4 x 8 rows (cached layout, one
   group per micro-batch, as bench_train_layout.py) at P, C, with all three switched off (the
   code before) and on, alternating; seconds per step, every repeat printed.

3. --profile: one step each way under torch.profiler, the ops with the most self CPU time.

    python benchmarks/bench_lean_ops.py [--repeats 20] [--steps 3] [--prompt-len 40] [--completion-len 128] [--profile]
    python benchmarks/bench_lean_ops.py --only ops --dtype bfloat16    # bf16's SwiGLU and RMSNorm
"""
import argparse
import contextlib
import os
import statistics
import time
import types

import torch

from _bench_utils import lora_policy_and_batch


@contextlib.contextmanager
def torch_swiglu():
    """silu_mul's PyTorch ops and HF's RMSNorm module instead of the core (native_for answers None
    under this variable)."""
    os.environ["GRPO_FAST_KV_REFERENCE"] = "1"
    try:
        yield
    finally:
        del os.environ["GRPO_FAST_KV_REFERENCE"]


def set_lean_lora(model, on: bool) -> None:
    from grpo_fast.lean_lora import _lean_forward
    for m in model.modules():
        if "_peft_forward" in m.__dict__:
            m.forward = types.MethodType(_lean_forward, m) if on else m._peft_forward


def timed(fn, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def show(name, before, after):
    mb, ma = statistics.median(before), statistics.median(after)
    print(f"{name:34s} before {mb:7.2f} ms  lean {ma:7.2f} ms  x{mb / ma:4.1f}", flush=True)
    print(f"  every run, before: {' '.join(f'{t:.2f}' for t in before)}")
    print(f"  every run, lean:   {' '.join(f'{t:.2f}' for t in after)}", flush=True)


def bench_ops(repeats, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model

    from grpo_fast.lean_lora import use_lean_lora
    from grpo_fast.swiglu import silu_mul

    n = 1016
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(n, 1536, generator=g).to(dtype).requires_grad_()
    up = torch.randn(n, 1536, generator=g).to(dtype).requires_grad_()
    d = torch.randn(n, 1536, generator=g).to(dtype)
    print(f"ops: {dtype}", flush=True)

    def swiglu():
        silu_mul(gate, up).backward(d)
    swiglu()
    before, after = [], []
    for _ in range(repeats):  # interleaved, so drift on the machine hits both alike
        with torch_swiglu():
            before += timed(swiglu, 1)
        after += timed(swiglu, 1)
    show("silu_mul [1016, 1536]", before, after)

    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from grpo_fast.rms_norm import use_lean_rms_norm
    norm = LlamaRMSNorm(576, eps=1e-5).to(dtype)
    norm.requires_grad_(False)
    use_lean_rms_norm(norm)
    h = torch.randn(n, 576, generator=g).to(dtype).requires_grad_()
    dh = torch.randn(n, 576, generator=g).to(dtype)

    def rmsnorm():
        norm(h).backward(dh)
    before, after = [], []
    for _ in range(repeats):
        with torch_swiglu():
            before += timed(rmsnorm, 1)
        after += timed(rmsnorm, 1)
    show("RMSNorm [1016, 576]", before, after)
    if dtype != torch.float32:  # the LoRA linears: bf16 is bench_bf16_cpu.py's (fp32 adapters over bf16)
        return

    for k, m in ((576, 1536), (1536, 576), (576, 576), (576, 192)):
        lin = torch.nn.Sequential(torch.nn.Linear(k, m, bias=False))
        lin.requires_grad_(False)
        layer = get_peft_model(lin, LoraConfig(r=16, lora_alpha=32, target_modules=["0"])).base_model.model[0]
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
        use_lean_lora(layer)
        x = torch.randn(n, k, generator=g, requires_grad=True)
        dy = torch.randn(n, m, generator=g)

        def run():
            layer(x).backward(dy)
        before, after = [], []
        for _ in range(repeats):
            layer.forward = layer._peft_forward
            before += timed(run, 1)
            set_lean_lora(layer, True)
            after += timed(run, 1)
        show(f"LoRA linear {k} -> {m}, r 16", before, after)


def bench_step(steps, P, C, profile=False):
    from grpo_fast.train.packed_forward import completion_hidden

    model, pol, batch, w = lora_policy_and_batch(4, 8, P, C)
    cuts = [slice(s, s + 8) for s in range(0, 32, 8)]

    def step():
        for rows in cuts:
            h = completion_hidden(pol.decoder, batch.select(rows), layout="cached")
            (h @ w).sum().backward()
        model.zero_grad(set_to_none=True)

    def before():
        set_lean_lora(model, False)
        with torch_swiglu():
            step()

    def lean():
        set_lean_lora(model, True)
        step()
    before(), lean()  # warm-up
    if profile:
        for name, fn in (("before", before), ("lean", lean)):
            with torch.profiler.profile() as prof:
                fn()
            print(f"profile, {name}:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
    b, a = [], []
    print(f"step: completion_hidden forward + backward, 4 x 8 rows, P = {P}, C = {C}, cached layout", flush=True)
    for i in range(steps):
        b += [t / 1e3 for t in timed(before, 1)]
        a += [t / 1e3 for t in timed(lean, 1)]
        print(f"  repeat {i}: before {b[-1]:.2f} s, lean {a[-1]:.2f} s", flush=True)
    print(f"step median: before {statistics.median(b):.2f} s, lean {statistics.median(a):.2f} s, "
          f"x{statistics.median(b) / statistics.median(a):.2f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--completion-len", type=int, default=128)
    ap.add_argument("--only", choices=["ops", "step"])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="the ops' dtype (bfloat16: SwiGLU and RMSNorm only)")
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}", flush=True)
    if a.only != "step":
        bench_ops(a.repeats, getattr(torch, a.dtype))
    if a.only != "ops":
        bench_step(a.steps, a.prompt_len, a.completion_len, a.profile)
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
