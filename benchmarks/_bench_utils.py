"""Shared benchmark plumbing: peak memory, timing, environment record, subprocess workers."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- memory


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """Peak memory above a baseline, in bytes.

    CPU: resident set size. `reset()` takes the current RSS as the baseline and resets the
    kernel's high-water mark (writing 5 to /proc/self/clear_refs); `peak_above_baseline()` reads
    VmHWM. CUDA: torch.cuda.max_memory_allocated over memory_allocated at reset.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.baseline = 0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.baseline = _proc_status_kb("VmRSS") * 1024

    def peak_above_baseline(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline
        return _proc_status_kb("VmHWM") * 1024 - self.baseline


# ---------------------------------------------------------------- timing


def time_reps(fn, device: torch.device, warmup: int, reps: int) -> tuple[list[float], list[float]]:
    """(wall seconds, process CPU seconds) of each of `reps` calls after `warmup` untimed ones.

    CPU seconds (all threads) are the steadier number on a machine shared with other jobs."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    sync()
    times, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return times, cpu


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ---------------------------------------------------------------- environment


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def environment(device: torch.device) -> dict:
    return {
        "device": device_name(device),
        "device_type": device.type,
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("torch", "triton", "liger-kernel", "grpo-fast")},
        "git_commit": git_commit(),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def load_average() -> list[float]:
    return list(os.getloadavg())


# ---------------------------------------------------------------- workers and results


# glibc's malloc raises its mmap threshold (up to 32 MiB) each time a large block is freed, so
# later blocks of a few MiB come from the heap and stay resident after free: the RSS high-water
# mark then counted memory no tensor held, and moved by ±30 MiB between runs of the same code
# (ours 82-113 MiB, Liger 100-130). A fixed threshold returns every block over 128 KiB to the
# system when freed, so the peak RSS follows what each implementation holds (same code, same
# figure: ours 79, 79; Liger 72, 74).
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_worker(script: str, args: list[str], timeout: float) -> dict:
    """Run `python script --worker args...` in a fresh process (with WORKER_ENV, unless the caller's
    environment sets those variables); its last stdout line is JSON."""
    cmd = [sys.executable, script, "--worker", *args]
    env = {**WORKER_ENV, **os.environ}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["exit %d" % proc.returncode]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_results(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{name}-{payload['env']['device_type']}-{stamp}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
    return path


def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------- training-pass fixtures


def lora_policy_and_batch(B: int, G: int, P: int, C: int, seed: int = 0):
    """SmolLM2-135M + LoRA r = 16 in train mode, its policy modules, and a packed batch of B random
    prompts of P tokens x G random completions of C tokens; plus a random [H] vector w so that
    (hidden @ w).sum() is a scalar to backpropagate. -> (model, policy, batch, w)."""
    from grpo_fast.config import load_config
    from grpo_fast.train.model import load_policy, policy_modules
    from grpo_fast.train.rollout_batch import make_batch

    cfg = load_config(None, {"lora.r": 16, "lora.lora_alpha": 32})
    model, _, _ = load_policy(cfg.model, cfg.lora, seed=seed)
    model.train()
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(100, 40000, (P,), generator=g).tolist() for _ in range(B)]
    comps = [torch.randint(100, 40000, (C,), generator=g).tolist() for _ in range(B * G)]
    batch = make_batch([p for p in prompts for _ in range(G)], comps, pad_id=0)
    return model, policy_modules(model), batch, torch.randn(model.config.hidden_size, generator=g)
