"""The training pass (forward + backward of the packed policy, SmolLM2-135M + LoRA r = 16) idle
and beside a competing CPU-bound process, under torch thread settings that have to be chosen
before torch loads (each setting runs in its own process):

    default   torch's libgomp as shipped (waiting threads spin before they sleep)
    passive   OMP_WAIT_POLICY=PASSIVE (waiting threads sleep at once)
    spin      GOMP_SPINCOUNT=10000 (a short spin, then sleep)
    threads1  torch.set_num_threads(1)
    governor  grpo_fast.thread_governor.ThreadGovernor (the trainer's default on the CPU: each
              micro-batch on the cores other processes left free during the previous one)

    python benchmarks/bench_train_load.py --settings default,threads1,governor --busy none,python --repeats 3

Prints every repeat (seconds for B x G = 4 x 8 rows in micro-batches of 8) and, per setting, the
best busy time over the best idle time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SETTINGS = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin": {"GOMP_SPINCOUNT": "10000"},
    "threads1": {},
    "governor": {},
}


def child(setting: str, busy_kinds: list[str], repeats: int, prompt_len: int, completion_len: int):
    import time

    import torch

    sys.path.insert(0, os.path.dirname(__file__))
    from _bench_utils import lora_policy_and_batch
    from _busy import busy

    from grpo_fast.train.packed_forward import completion_hidden
    from grpo_fast.thread_governor import ThreadGovernor

    if setting == "threads1":
        torch.set_num_threads(1)
    governor = ThreadGovernor() if setting == "governor" else None
    B, G = 4, 8
    model, pol, batch, w = lora_policy_and_batch(B, G, prompt_len, completion_len)

    def micro_batch(part):
        (completion_hidden(pol.decoder, part) @ w).sum().backward()

    def step():
        t0 = time.perf_counter()
        for s in range(0, B * G, 8):
            part = batch.select(slice(s, s + 8))
            if governor is None:
                micro_batch(part)
            else:
                with governor.measure():
                    micro_batch(part)
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step()  # warm-up
    for kind in busy_kinds:
        with busy(kind):
            times = [round(step(), 2) for _ in range(repeats)]
        extra = {} if governor is None else {"governor": governor.describe()}
        print(json.dumps({"setting": setting, "busy": kind, "seconds": times, **extra}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="default,passive,spin,threads1,governor")
    ap.add_argument("--busy", default="none,python")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--completion-len", type=int, default=64)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    kinds = a.busy.split(",")
    if a.child:
        return child(a.child, kinds, a.repeats, a.prompt_len, a.completion_len)
    rows = []
    for setting in a.settings.split(","):
        if setting not in SETTINGS:
            raise SystemExit(f"--settings: unknown {setting!r}; one of {sorted(SETTINGS)}")
        env = {**os.environ, **SETTINGS[setting]}
        cmd = [sys.executable, __file__, "--child", setting, "--busy", a.busy, "--repeats", str(a.repeats),
               "--prompt-len", str(a.prompt_len), "--completion-len", str(a.completion_len)]
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) as proc:
            for line in proc.stdout:  # as each condition ends
                if line.startswith("{"):
                    rows.append(json.loads(line))
                    print(line, end="", flush=True)
        if proc.returncode:
            raise SystemExit(f"setting {setting}: the measuring process failed (exit {proc.returncode})")
    print(f"\nP = {a.prompt_len}, C = {a.completion_len}, 4 x 8 rows, micro-batches of 8")
    print("| setting | " + " | ".join(f"{k} s (every repeat)" for k in kinds) + " | best busy / best idle |")
    print("|---|" + "---|" * len(kinds) + "---:|")
    for setting in a.settings.split(","):
        got = {r["busy"]: r["seconds"] for r in rows if r["setting"] == setting}
        ratio = (f"{min(got[kinds[-1]]) / min(got[kinds[0]]):.2f}" if len(kinds) > 1 and all(k in got for k in kinds)
                 else "-")
        print(f"| {setting} | " + " | ".join(", ".join(map(str, got.get(k, []))) for k in kinds) + f" | {ratio} |")


if __name__ == "__main__":
    main()
