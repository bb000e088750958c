"""The bodies of the GPU check's stages (scripts/gpu_check.py runs each in its own process).

    python scripts/gpu_stages.py STAGE [--tiny] [--result PATH]

Each stage writes its result JSON to --result (default: $GPU_CHECK_RESULT), atomically, as
soon as it has something to say (a benchmark rewrites it after every run), and exits 0 (pass),
77 (skipped: the JSON says why) or anything else (fail). The JSON may hold `figures`: the
headline lines the summary prints.

    env            versions, GPU, driver, nvcc
    wheels         install GRPO_FAST_WHEELS (default .whl/) into a target folder, never over torch
    build          pip install -e . with nvcc for this GPU's arch only; check _C has every CUDA op
    bench-loss     benchmarks/bench_loss.py: fused loss vs naive (and Liger) at N = 8192, bf16
    bench-sampler  benchmarks/bench_sampler.py: sampler vs HF generate, 16 x 8 x 512, with and
                   without CUDA graphs, Qwen2.5-1.5B-sized random-init model
    bench-cascade  benchmarks/bench_kv.py --only cascade --device cuda: cascade vs per-sequence
                   paged decode attention, P = 128 / 1,024 / 4,096, G = 8 / 16, bf16
    step           one GRPO step (after a warm-up step) of that model with LoRA; --4bit: NF4 base
    stub, sleep    the dry run's stand-ins (a GPU stage with no GPU; a stage that hangs)

--tiny runs a stage at toy size on whatever device there is (the CPU rehearsal in
tests/test_gpu_check.py): same code, same JSON.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
EXIT_SKIP = 77
CUDA_OPS = ["cuda_append_kv", "cuda_copy_blocks", "cuda_paged_decode_attention", "cuda_prefill_attention",
            "cuda_sample"]
PACKAGES = ["torch", "triton", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "numpy",
            "bitsandbytes", "liger-kernel", "trl", "flash-attn", "pytest", "pytest-timeout", "scikit-build-core",
            "pybind11", "cmake", "ninja", "grpo-fast"]
LOSS_CONFIGS = {False: "8192x576x49152,8192x1536x151936", True: "512x64x1031"}  # N x H x V


class Result:
    """The stage's JSON, rewritten (tmp + rename) on every save."""

    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        self.data: dict = {"figures": []}

    def save(self, **fields) -> None:
        self.data.update(fields)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)

    def figure(self, line: str) -> None:
        self.data["figures"].append(line)
        self.save()


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str], **kw) -> int:
    """Run a command with its output going to ours (the check's log); return its exit code."""
    print("+ " + " ".join(map(str, cmd)), flush=True)
    return subprocess.run([str(c) for c in cmd], **kw).returncode


def _capture(cmd: list[str], timeout: float = 20) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for cand in (os.environ.get("CUDACXX"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).is_file():
            return cand
    return None


def _work() -> Path:
    work = Path(os.environ.get("GPU_CHECK_WORK") or "/tmp/gpu-check-work")
    work.mkdir(parents=True, exist_ok=True)
    return work


# ---------------------------------------------------------------- env


def stage_env(args, res: Result) -> int:
    info: dict = {"python": platform.python_version(), "executable": sys.executable,
                  "platform": platform.platform(), "cpu_count": os.cpu_count(),
                  "packages": {p: _version(p) for p in PACKAGES}}
    res.save(**info)
    try:
        import torch

        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                    device_count=torch.cuda.device_count() if torch.cuda.is_available() else 0)
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", arch=f"{props.major}{props.minor}",
                        gpu_memory_mib=props.total_memory // 2**20, sm_count=props.multi_processor_count,
                        cudnn=torch.backends.cudnn.version())
    except Exception as err:  # a broken torch is the finding, not a crash
        info.update(torch_error=f"{type(err).__name__}: {err}", cuda_available=False)
    smi = _capture(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    if smi:
        info["nvidia_smi"] = smi.splitlines()[0]
        info["driver"] = smi.splitlines()[0].split(",")[1].strip()
    nvcc = _nvcc()
    info["nvcc"] = nvcc
    if nvcc:
        out = _capture([nvcc, "--version"]) or ""
        info["nvcc_version"] = next((ln.strip() for ln in out.splitlines() if "release" in ln), out[-80:])
    info["git_commit"] = _capture(["git", "-C", str(REPO), "rev-parse", "HEAD"], timeout=5)
    v = info["packages"]
    gpu = (f"{info['gpu']} (sm_{info['arch']}, {info['sm_count']} SMs, {info['gpu_memory_mib']} MiB), "
           f"driver {info.get('driver', '?')}" if info.get("cuda_available") else "no CUDA device")
    res.save(**info)
    res.figure(f"GPU: {gpu}")
    res.figure(f"torch {info.get('torch', '-')} (CUDA {info.get('torch_cuda') or '-'}), triton {v['triton'] or '-'}, "
               f"transformers {v['transformers'] or '-'}, peft {v['peft'] or '-'}, python {info['python']}, "
               f"nvcc: {info.get('nvcc_version') or 'none'}")
    return 0


# ---------------------------------------------------------------- wheels


def stage_wheels(args, res: Result) -> int:
    folder = os.environ.get("GRPO_FAST_WHEELS") or (".whl" if (REPO / ".whl").is_dir() else "")
    if not folder:
        res.save(skipped="no wheel folder (GRPO_FAST_WHEELS unset, no .whl/): bitsandbytes / Liger paths skipped")
        return EXIT_SKIP
    wheels = sorted((REPO / folder).glob("*.whl"))
    names = [w.name for w in wheels]
    res.save(folder=folder, wheels=names)
    if not wheels:
        res.save(skipped=f"no *.whl in {folder}")
        return EXIT_SKIP
    if args.dry_run:
        res.save(skipped=f"dry run: would install {len(wheels)} wheels from {folder}: {', '.join(names)}")
        return EXIT_SKIP
    target = Path(args.target or _work() / "site")
    target.mkdir(parents=True, exist_ok=True)
    # --no-deps --no-index: never touches the torch that is there, never waits on a network.
    rc = _run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", target, *wheels])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")])))
    imports = {}
    carried = {w.name.split("-")[0].lower() for w in wheels}  # wheel names spell liger-kernel liger_kernel
    for mod, dist in (("bitsandbytes", "bitsandbytes"), ("liger_kernel", "liger-kernel"), ("trl", "trl")):
        if mod not in carried:
            continue
        code = f"import {mod}; from importlib.metadata import version; print(version({dist!r}))"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        imports[mod] = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else \
            "FAILS: " + ((r.stderr.strip().splitlines() or ["?"])[-1])[:300]
    res.save(target=str(target), pip_exit_code=rc, imports=imports)
    res.figure("wheels: " + (", ".join(f"{m} {v}" for m, v in imports.items()) or ", ".join(names)))
    return rc


# ---------------------------------------------------------------- build


def stage_build(args, res: Result) -> int:
    arch = os.environ.get("GPU_CHECK_ARCH")
    if not arch:
        import torch

        if not torch.cuda.is_available():
            res.save(skipped="no CUDA device")
            return EXIT_SKIP
        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}{minor}"
    env = dict(os.environ, GRPO_FAST_CUDA="ON", GRPO_FAST_CUDA_ARCHS=arch,
               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 4))
    nvcc = _nvcc()
    if nvcc and not shutil.which("nvcc"):  # CMake looks on PATH (or CUDACXX)
        env["CUDACXX"] = nvcc
        env["PATH"] = f"{Path(nvcc).parent}{os.pathsep}{env.get('PATH', '')}"
    res.save(arch=arch, nvcc=nvcc)
    t0 = time.perf_counter()
    # Against the torch that is there: no deps (bitsandbytes / gguf are absent there), no index
    # (no network), no build isolation (scikit-build-core, pybind11, cmake, ninja come from the image).
    rc = _run([sys.executable, "-m", "pip", "install", "-v", "--no-index", "--no-deps", "--no-build-isolation",
               f"-Cbuild-dir=build/gpu-check-sm{arch}", "-e", "."], env=env, cwd=REPO)
    res.save(pip_exit_code=rc, pip_seconds=round(time.perf_counter() - t0, 1))
    code = ("import json, grpo_fast._C as C, importlib\n"
            "ops = [n for n in %r if hasattr(C, n)]\n"
            "try:\n    importlib.import_module('grpo_fast.kernels.logprob'); k = 'ok'\n"
            "except Exception as e:\n    k = f'{type(e).__name__}: {e}'\n"
            "print(json.dumps(dict(so=C.__file__, built_with_cuda=C.built_with_cuda(), cuda_ops=ops, kernels=k)))"
            % CUDA_OPS)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    if r.returncode != 0:
        res.save(import_error=(r.stderr.strip().splitlines() or ["?"])[-1])
        res.figure(f"build: grpo_fast._C does not import: {res.data['import_error']}")
        return 1
    built = json.loads(r.stdout.strip().splitlines()[-1])
    missing = [n for n in CUDA_OPS if n not in built["cuda_ops"]]
    res.save(**built, missing_cuda_ops=missing)
    res.figure(f"build: sm_{arch} in {res.data['pip_seconds']:.0f} s, _C with CUDA: {built['built_with_cuda']}, "
               f"CUDA ops {len(built['cuda_ops'])}/{len(CUDA_OPS)}, Triton kernels import: {built['kernels']}")
    return 0 if rc == 0 and built["built_with_cuda"] and not missing and built["kernels"] == "ok" else 1


# ---------------------------------------------------------------- benchmarks


def stage_bench_loss(args, res: Result) -> int:
    impls = ["naive", "ours"] + (["liger"] if importlib.util.find_spec("liger_kernel") else [])
    out = _work() / "bench_loss.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, BENCH / "bench_loss.py", "--configs", LOSS_CONFIGS[args.tiny], "--impls", ",".join(impls),
           "--warmup", "2", "--reps", "5", "--timeout", "150", "--out", out]
    if args.tiny:
        cmd += ["--device", "cpu", "--dtype", "float32", "--warmup", "0", "--reps", "1"]
    res.save(impls=impls, liger="liger" in impls or "not importable")
    rc = _run(cmd, cwd=REPO)
    raw = json.loads(out.read_text()) if out.is_file() else {}
    res.save(bench=raw, bench_exit_code=rc)
    ok = rc == 0 and raw.get("complete", False)
    for config in LOSS_CONFIGS[args.tiny].split(","):
        by = {r["impl"]: r for r in raw.get("runs", []) if r.get("config") == config}
        errors = {k: r["error"] for k, r in by.items() if "error" in r}
        ok &= not errors and set(by) == set(impls)
        good = {k: r for k, r in by.items() if "error" not in r}
        naive, ours = good.get("naive"), good.get("ours")
        parts = [f"{k} {r['median_s'] * 1e3:.1f} ms" + (f" ({r['median_s'] / naive['median_s']:.2f}x naive's time)"
                                                       if naive and k != "naive" else "")
                 for k, r in good.items()]
        if naive and ours and naive["peak_bytes"] > 0:
            parts.append(f"memory ours/naive {ours['peak_bytes'] / naive['peak_bytes']:.3f}")
            # The same loss from both, to bf16 accuracy: a wrong kernel is a failure, not a figure.
            agree = abs(ours["loss"] - naive["loss"]) <= 2e-2 * max(1.0, abs(naive["loss"])) and \
                abs(ours["grad_norm"] - naive["grad_norm"]) <= 5e-2 * max(1e-6, naive["grad_norm"])
            ok &= agree
            parts.append("loss/grad agree with naive" if agree else
                         f"MISMATCH loss {ours['loss']:.5f} vs {naive['loss']:.5f}, "
                         f"grad norm {ours['grad_norm']:.4g} vs {naive['grad_norm']:.4g}")
        if errors:
            parts.append("errors: " + "; ".join(f"{k}: {e}" for k, e in errors.items()))
        res.figure(f"loss {config} {raw.get('dtype', '?')} fwd+bwd: " + ", ".join(parts))
    return 0 if ok else 1


def stage_bench_sampler(args, res: Result) -> int:
    out = _work() / "bench_sampler.json"
    out.unlink(missing_ok=True)
    if args.tiny:
        size = ["--preset", "tiny-random", "--dtype", "float32", "--prompts", "2", "--group", "2",
                "--new-tokens", "4", "--engines", "hf,ours"]
    else:
        size = ["--preset", "qwen2.5-1.5b-random", "--dtype", "bfloat16", "--prompts", "16", "--group", "8",
                "--new-tokens", "512", "--engines", "hf,ours,ours-graphs"]
    rc = _run([sys.executable, BENCH / "bench_sampler.py", *size, "--repeats", "1", "--out", out], cwd=REPO)
    raw = json.loads(out.read_text()) if out.is_file() else {}
    res.save(bench=raw, bench_exit_code=rc)
    runs = {k: max(v, key=lambda x: x["tokens_per_s"]) for k, v in raw.get("results", {}).items() if v}
    hf = runs.get("hf_generate")
    names = {"hf_generate": "HF generate", "grpo_fast": "ours", "grpo_fast_cuda_graphs": "ours + CUDA graphs"}
    parts = []
    for key, r in runs.items():
        ratio = f" ({r['tokens_per_s'] / hf['tokens_per_s']:.2f}x)" if hf and key != "hf_generate" else ""
        parts.append(f"{names.get(key, key)} {r['tokens_per_s']:,.0f} tok/s{ratio}")
    kv = ", ".join(f"{names.get(k, k)} {r['kv_bytes'] / 2**20:,.0f}" for k, r in runs.items())
    shape = f"{raw.get('prompts', '?')}x{raw.get('group', '?')}x{raw.get('new_tokens', '?')}"
    res.figure(f"sampler {shape} {raw.get('model', '?')} {raw.get('dtype', '')}: "
               + "; ".join(parts or ["no run finished"]) + (f"; KV MiB: {kv}" if kv else ""))
    return 0 if rc == 0 and raw.get("complete") else 1


def stage_bench_cascade(args, res: Result) -> int:
    """Cascade vs per-sequence paged decode attention, the CUDA kernels (bench_kv.py --only cascade
    --device cuda): the figure issue 14 could not measure without a GPU. --tiny: the CPU kernels
    at the quick size. A kernel pair that disagrees fails the stage."""
    import torch

    out = _work() / "bench_cascade.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, BENCH / "bench_kv.py", "--only", "cascade", "--json", out]
    cmd += ["--quick"] if args.tiny else ["--repeats", "20"]
    if torch.cuda.is_available():
        cmd += ["--device", "cuda"]
    rc = _run(cmd, cwd=REPO)
    raw = json.loads(out.read_text()) if out.is_file() else {}
    res.save(bench=raw, bench_exit_code=rc)
    tol = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 4e-3}
    ok = rc == 0 and raw.get("complete", False) and bool(raw.get("cascade"))
    for r in raw.get("cascade", []):
        agree = r["max_abs_diff"] <= tol.get(r["dtype"], 2e-2)
        ok &= agree
        res.figure(f"cascade P={r['P']} {r['B']}x{r['G']} heads {r['hq']}/{r['hkv']}x{r['D']} {r['dtype']}: "
                   f"paged {r['paged_ms']:.3f} ms, cascade {r['cascade_ms']:.3f} ms ({r['speedup']:.2f}x)"
                   + ("" if agree else f" MISMATCH max |diff| {r['max_abs_diff']:.2e}"))
    return 0 if ok else 1


# ---------------------------------------------------------------- one GRPO step


def stage_step(args, res: Result) -> int:
    import torch

    if args.four_bit and importlib.util.find_spec("bitsandbytes") is None:
        res.save(skipped="bitsandbytes is not importable (carry its wheel: scripts/fetch_gpu_wheels.sh)")
        return EXIT_SKIP
    sys.path.insert(0, str(BENCH))  # gpu_models: the model and the reward module
    os.environ["PYTHONPATH"] = os.pathsep.join([str(BENCH)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    from gpu_models import save_model_folder

    from grpo_fast.config import load_config
    from grpo_fast.train.loop import train
    from grpo_fast.train.metrics import read_metrics

    cuda = torch.cuda.is_available()
    preset = "tiny-random" if args.tiny else "qwen2.5-1.5b-random"
    dtype = torch.bfloat16 if cuda else torch.float32
    work = _work()
    t0 = time.perf_counter()
    folder = save_model_folder(work / f"model-{preset}", preset, device="cuda" if cuda else "cpu", dtype=dtype)
    res.save(model=preset, model_folder=str(folder), model_write_s=round(time.perf_counter() - t0, 1))
    B, G, C = (2, 2, 4) if args.tiny else (8, 8, 128)
    out_dir = work / f"run-{preset}{'-4bit' if args.four_bit else ''}"
    shutil.rmtree(out_dir, ignore_errors=True)
    overrides = {
        "model.name_or_path": str(folder), "model.dtype": "bfloat16" if cuda else "float32",
        "model.load_in_4bit": args.four_bit, "lora.r": 16, "lora.lora_alpha": 32,
        "sampling.num_generations": G, "sampling.max_completion_length": C, "sampling.max_prompt_length": 512,
        "loss.loss_type": "dapo", "loss.beta": 0.04, "loss.epsilon": 0.2, "loss.epsilon_high": 0.28,
        "train.output_dir": str(out_dir), "train.max_steps": 2, "train.prompts_per_step": B,
        "train.micro_batch_size": 2 * G, "train.learning_rate": 1e-5, "train.eval_before": False,
        "train.progress": False, "train.time_budget_s": 0, "train.seed": 0,
        # LoRA: torch's AdamW, so a bitsandbytes problem shows in the 4-bit stage alone; 4-bit: auto
        # (bitsandbytes' 8-bit AdamW on CUDA), the QLoRA default.
        "train.optim": "auto" if args.four_bit else "adamw",
        "data.task": "arithmetic", "data.train_size": 64, "data.eval_size": 0,
        # Not `accuracy`: random text may hold LaTeX, which it hands to math-verify (absent on the GPU image).
        "rewards.funcs": ["gpu_models:token_parity"],
    }
    cfg = load_config(None, overrides)
    res.save(config=overrides)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    lines: list[str] = []
    train(cfg, echo=lambda *a: (lines.append(" ".join(map(str, a))), print(*a, flush=True)))
    wall = time.perf_counter() - t0
    steps = [r for r in read_metrics(out_dir) if "reward" in r]
    if len(steps) < 2:
        res.save(error=f"expected 2 logged steps, got {len(steps)}", echo=lines[-20:])
        return 1
    keep = ("time/sample_s", "time/step_s", "tokens_per_s", "completion_tokens", "reward", "loss", "kl",
            "grad_norm", "sampler/decode_tokens_per_s")
    measured = steps[-1]  # the first step is the warm-up (allocator, Triton JIT, lazy inits)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    res.save(wall_s=round(wall, 1), warmup_step={k: steps[0].get(k) for k in keep},
             step={k: measured.get(k) for k in keep}, peak_gpu_bytes=peak, echo=lines[-10:])
    finite = all(v == v for v in (measured.get("loss"), measured.get("grad_norm")) if v is not None)
    sample_s, step_s = measured["time/sample_s"], measured["time/step_s"]
    mem = f", peak {peak / 2**30:.1f} GiB" if peak else ""
    res.figure(f"GRPO step {'4-bit NF4 + ' if args.four_bit else ''}LoRA r16, {B}x{G} <= {C} tokens, {preset} "
               f"{'bf16' if cuda else 'fp32'}: {step_s:.2f} s (sampling {sample_s:.2f} s, training "
               f"{step_s - sample_s:.2f} s), {measured.get('completion_tokens', 0):.0f} tokens{mem}; "
               f"warm-up step {steps[0]['time/step_s']:.2f} s" + ("" if finite else "; loss/grad NOT FINITE"))
    return 0 if finite else 1


# ---------------------------------------------------------------- dry-run stand-ins


def stage_stub(args, res: Result) -> int:
    res.save(skipped=args.reason)
    return EXIT_SKIP


def stage_sleep(args, res: Result) -> int:
    res.save(partial="written before the hang: a stage's JSON survives its time limit")
    time.sleep(args.seconds)
    res.save(partial="slept to the end (the time limit did not fire)")
    return 0


STAGES = {"env": stage_env, "wheels": stage_wheels, "build": stage_build, "bench-loss": stage_bench_loss,
          "bench-sampler": stage_bench_sampler, "bench-cascade": stage_bench_cascade, "step": stage_step,
          "stub": stage_stub, "sleep": stage_sleep}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=sorted(STAGES))
    p.add_argument("--result", default=os.environ.get("GPU_CHECK_RESULT"), help="where to write the stage's JSON")
    p.add_argument("--tiny", action="store_true", help="toy sizes on any device (CPU rehearsal)")
    p.add_argument("--4bit", dest="four_bit", action="store_true", help="step: NF4 base (needs bitsandbytes)")
    p.add_argument("--dry-run", action="store_true", help="wheels: list, install nothing")
    p.add_argument("--target", default=None, help="wheels: install folder (default $GPU_CHECK_WORK/site)")
    p.add_argument("--reason", default="no GPU", help="stub: why the stage is skipped")
    p.add_argument("--seconds", type=float, default=30.0, help="sleep: how long")
    args = p.parse_args(argv)
    res = Result(args.result)
    res.save(stage=args.stage)
    return STAGES[args.stage](args, res)


if __name__ == "__main__":
    sys.exit(main())
