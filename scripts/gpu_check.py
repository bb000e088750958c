"""The GPU check's stage runner: every stage in its own process group, under its own time limit,
inside one overall budget; results written as each stage ends. Standard library only: it runs
before the project is installed. Entry point: scripts/gpu_check.sh (README "GPU check").

    python scripts/gpu_check.py [--dry-run] [--budget S] [--only a,b] [OUT_DIR]

OUT_DIR (default runs/gpu-check, gitignored) receives at most 6 files:

    summary.json       the whole record: environment, every stage (status, seconds, limit, its
                       JSON, the tail of its output), the headline figures; rewritten after each stage
    summary.txt        the one-screen summary, as printed at the end
    stages.jsonl       one line per stage, appended the moment it ends
    gpu_check.log      every stage's full output, under a header per stage
    junit-gpu.xml      pytest -m gpu
    junit-kernels.xml  the Triton and native-build tests, which run on the GPU when there is one

A stage ends as pass (exit 0), fail, timeout (killed at its limit, with its process group) or
skipped (exit 77, or not started: no GPU, or too little of the budget left). A hang or a crash
in one stage costs that stage only. Exit code: 0 when no stage failed or timed out, 1 when one
did, 2 when there is no GPU (outside --dry-run).

--dry-run rehearses all of this on a machine without a GPU: the environment stage runs, the GPU
stages are stand-ins that report "no GPU", and two probes prove the machinery: one sleeps past a
1 s limit (recorded as timeout), one exits 3 (recorded as fail); both are expected, so the dry
run exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
STAGES_PY = "scripts/gpu_stages.py"
EXIT_SKIP = 77
DEFAULT_BUDGET_S = 465  # the whole check, build included, under 8 minutes
MIN_STAGE_S = 20  # a stage is not started with less of the budget left
OUT_FILES = ("summary.json", "summary.txt", "stages.jsonl", "gpu_check.log", "junit-gpu.xml", "junit-kernels.xml")
KERNEL_TESTS = ["tests/test_triton_logprob.py", "tests/test_ops_triton_e2e.py", "tests/test_native_build.py"]


@dataclass
class Stage:
    name: str
    what: str
    limit_s: float
    argv: list[str] | Callable[[dict], list[str]]
    gpu: bool = True  # not started without a CUDA device
    junit: str | None = None  # JUnit XML file (in OUT_DIR) to read the test counts from
    expect: str | None = None  # dry-run probes: the status they must end in


def plan(py: str, out: Path, dry_run: bool) -> list[Stage]:
    """The stages, in order of what a short GPU session must learn first."""
    stage = [py, STAGES_PY]

    def pytest(junit: str, *selection: str) -> Callable[[dict], list[str]]:
        def argv(ctx: dict) -> list[str]:
            per_test = ["--timeout", "90"] if ctx.get("packages", {}).get("pytest-timeout") else []
            # a module that fails to import costs its own tests, not the whole stage
            return [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors", *per_test,
                    f"--junitxml={out / junit}", *selection]
        return argv

    stages = [
        Stage("env", "versions, GPU, driver, nvcc", 45, stage + ["env"], gpu=False),
        Stage("wheels", "GRPO_FAST_WHEELS (default .whl/) into a side folder", 60,
              stage + ["wheels"] + (["--dry-run"] if dry_run else []), gpu=False),
        Stage("build", "pip install -e . with nvcc for this GPU's arch", 240, stage + ["build"]),
        Stage("pytest_gpu", "pytest -m gpu", 120, pytest("junit-gpu.xml", "-m", "gpu", "tests"),
              junit="junit-gpu.xml"),
        Stage("bench_cascade", "cascade vs paged decode attention, CUDA kernels, bf16", 90,
              stage + ["bench-cascade"]),
        Stage("pytest_kernels", "Triton log-prob kernels, fused loss, native build, on the GPU", 120,
              pytest("junit-kernels.xml", *KERNEL_TESTS), junit="junit-kernels.xml"),
        Stage("bench_loss", "fused loss vs naive (and Liger), N=8192, bf16", 120, stage + ["bench-loss"]),
        Stage("bench_sampler", "sampler vs HF generate, 16x8x512, +- CUDA graphs", 150, stage + ["bench-sampler"]),
        Stage("step_lora", "one GRPO step, Qwen2.5-1.5B-sized, LoRA", 120, stage + ["step"]),
        Stage("step_4bit", "one GRPO step, NF4 base + LoRA (bitsandbytes)", 100, stage + ["step", "--4bit"]),
    ]
    if not dry_run:
        return stages
    for s in stages:  # the GPU stages' stand-ins: same runner path, same JSON, no GPU work
        if s.gpu:
            s.argv, s.junit = stage + ["stub", "--reason", "no GPU (dry run)"], None
    return stages + [
        Stage("probe_timeout", "dry run: sleeps 30 s under a 1 s limit", 1, stage + ["sleep", "--seconds", "30"],
              gpu=False, expect="timeout"),
        Stage("probe_fail", "dry run: a stage that crashes (exit 3)", 10, [py, "-c", "raise SystemExit(3)"],
              gpu=False, expect="fail"),
    ]


class Runner:
    def __init__(self, out: Path, work: Path, budget_s: float, dry_run: bool):
        self.out, self.work, self.budget_s, self.dry_run = out, work, budget_s, dry_run
        self.t0 = time.monotonic()
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.records: list[dict] = []
        self.ctx: dict = {}  # the env stage's result
        self.extra_path: list[str] = []  # the wheels' side folder, for the stages after it
        self.log = open(out / "gpu_check.log", "a", buffering=1)
        self.proc: subprocess.Popen | None = None
        self.current: str | None = None  # the stage running now

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, msg: str) -> None:
        print(f"[{self.elapsed():5.0f}s] {msg}", flush=True)

    # ---------------------------------------------------------------- one stage

    def run(self, stage: Stage) -> dict:
        rec = {"name": stage.name, "what": stage.what, "limit_s": stage.limit_s, "status": None, "seconds": 0.0}
        if stage.expect:
            rec["expected"] = stage.expect
        reason = self.skip_reason(stage)
        left = self.budget_s - self.elapsed()
        if reason is None and left < MIN_STAGE_S:
            reason = f"budget: {left:.0f} s of {self.budget_s:.0f} s left"
        if reason is not None:
            rec.update(status="skipped", reason=reason)
            return self.finish(rec)
        limit = min(stage.limit_s, left)
        rec["limit_s"] = round(limit, 1)
        result_path = self.work / "results" / f"{stage.name}.json"
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.unlink(missing_ok=True)
        argv = stage.argv(self.ctx) if callable(stage.argv) else stage.argv
        env = dict(os.environ, GPU_CHECK_RESULT=str(result_path), GPU_CHECK_WORK=str(self.work),
                   GPU_CHECK_OUT=str(self.out), PYTHONUNBUFFERED="1")
        if self.extra_path:
            env["PYTHONPATH"] = os.pathsep.join(self.extra_path + [p for p in [env.get("PYTHONPATH")] if p])
        if self.ctx.get("arch"):
            env["GPU_CHECK_ARCH"] = str(self.ctx["arch"])
        self.log.write(f"\n==== {stage.name}: {stage.what} (limit {limit:.0f} s) ====\n$ {' '.join(argv)}\n")
        self.log.flush()
        offset = (self.out / "gpu_check.log").stat().st_size  # this stage's output starts here
        self.say(f"{stage.name}: started, limit {limit:.0f} s")
        t = time.monotonic()
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.current = stage.name
        try:
            rc = self.proc.wait(timeout=limit)
            status = "pass" if rc == 0 else "skipped" if rc == EXIT_SKIP else "fail"
        except subprocess.TimeoutExpired:
            self.kill()
            rc, status = None, "timeout"
        except KeyboardInterrupt:  # the check itself is being stopped: take the stage down with it
            self.kill()
            raise
        reap_group(self.proc)  # workers the stage left behind go with it
        self.proc = self.current = None
        rec.update(status=status, exit_code=rc, seconds=round(time.monotonic() - t, 1))
        if status == "timeout":
            rec["reason"] = f"killed at its {limit:.0f} s limit"
        try:
            rec["result"] = json.loads(result_path.read_text()) if result_path.is_file() else None
        except (OSError, ValueError) as err:
            rec["result"] = {"unreadable": f"{type(err).__name__}: {err}"}
        result = rec["result"] or {}
        if status == "skipped":
            rec["reason"] = result.get("skipped", "the stage said so (exit 77)")
        if status == "fail" and result.get("error"):
            rec["reason"] = str(result["error"])[:300]
        if stage.junit:
            rec["tests"] = junit_counts(self.out / stage.junit)
        rec["log_tail"] = tail(self.out / "gpu_check.log", offset, 30)
        self.log.write(f"==== {stage.name}: {status} in {rec['seconds']} s (exit {rc}) ====\n")
        if stage.name == "env":
            self.ctx = result
        if stage.name == "wheels" and status == "pass" and result.get("target"):
            self.extra_path.append(result["target"])
        return self.finish(rec)

    def skip_reason(self, stage: Stage) -> str | None:
        if not stage.gpu or self.dry_run:
            return None
        if not self.ctx:
            return "the env stage gave no result"
        if not self.ctx.get("cuda_available"):
            return "no CUDA device (torch.cuda.is_available() is False)"
        return None

    def kill(self) -> None:
        """End the running stage and everything it started: TERM to its process group, KILL to
        whatever of the group is left 5 s later (a worker holding GPU memory must not outlive it)."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        reap_group(proc)

    def finish(self, rec: dict) -> dict:
        if rec.get("expected"):
            rec["as_expected"] = rec["status"] == rec["expected"]
        self.records.append(rec)
        with open(self.out / "stages.jsonl", "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        self.write_summary(final=False)
        note = rec.get("reason") or note_of(rec)
        self.say(f"{rec['name']}: {rec['status'].upper()} in {rec['seconds']:.1f} s" + (f" ({note})" if note else ""))
        if rec["status"] in ("fail", "timeout") and not rec.get("expected"):
            for line in rec.get("log_tail", [])[-15:]:
                print(f"    | {line}", flush=True)
        return rec

    # ---------------------------------------------------------------- summary

    def exit_code(self) -> int:
        bad = [r for r in self.records
               if r["status"] in ("fail", "timeout", "interrupted") and not r.get("as_expected")]
        bad += [r for r in self.records if r.get("expected") and not r.get("as_expected")]
        if bad:
            return 1
        if not self.dry_run and not self.ctx.get("cuda_available"):
            return 2
        return 0

    def summary(self, final: bool) -> dict:
        counts: dict = {}
        for r in self.records:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        figures = [f for r in self.records for f in ((r.get("result") or {}).get("figures") or [])]
        return {"schema": 1, "dry_run": self.dry_run, "final": final, "started_utc": self.started,
                "elapsed_s": round(self.elapsed(), 1), "budget_s": self.budget_s, "out_dir": str(self.out),
                "exit_code": self.exit_code() if final else None, "counts": counts,
                "env": {k: v for k, v in self.ctx.items() if k != "figures"},
                "stages": self.records, "figures": figures}

    def write_summary(self, final: bool) -> dict:
        data = self.summary(final)
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(data, indent=2, default=str))
        tmp.replace(self.out / "summary.json")
        return data

    def screen(self, data: dict) -> str:
        env = data["env"]
        head = "GPU check" + (" (DRY RUN: GPU stages stubbed)" if self.dry_run else "")
        lines = [f"{head}  {data['started_utc']}  commit {(env.get('git_commit') or '?')[:12]}"]
        for r in self.records:
            if r["name"] == "env":
                lines += [f"  {f}" for f in (r.get("result") or {}).get("figures", [])]
        lines.append("")
        lines.append(f"  {'stage':<15} {'status':<9} {'seconds':>7} {'limit':>6}  notes")
        for r in self.records:
            status = r["status"] + ("*" if r.get("as_expected") else "")
            note = r.get("reason") or note_of(r)
            lines.append(f"  {r['name']:<15} {status:<9} {r['seconds']:7.1f} {r['limit_s']:6.0f}  {note}"[:160])
        if any(r.get("as_expected") for r in self.records):
            lines.append("  (* = the probe ended as it must)")
        figures = [f for r in self.records if r["name"] != "env" for f in (r.get("result") or {}).get("figures", [])]
        if figures:
            lines.append("")
            lines += [f"  {f}" for f in figures]
        lines.append("")
        lines.append(f"  total {data['elapsed_s']:.0f} s of a {self.budget_s:.0f} s budget; exit {data['exit_code']}; "
                     f"results: {self.out / 'summary.json'}")
        return "\n".join(lines)


def reap_group(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of the stage's process group (its session), then reap the leader."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def note_of(rec: dict) -> str:
    tests = rec.get("tests")
    if tests and "error" not in tests:
        failing = f"; failing: {', '.join(tests['failing'][:3])}" if tests["failing"] else ""
        return (f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                f"{tests['skipped']} skipped{failing}")
    if tests:
        return tests["error"]
    if rec.get("status") == "fail" and rec.get("exit_code") is not None:
        return f"exit code {rec['exit_code']}"
    return ""


def junit_counts(path: Path) -> dict:
    """passed / failed / errors / skipped and the failing test ids from a pytest JUnit XML."""
    if not path.is_file():
        return {"error": f"no {path.name} (pytest did not finish)"}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        return {"error": f"{path.name}: {err}"}
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failing": []}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            counts["failing"].append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            counts["failing"].append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def tail(path: Path, offset: int, n: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-n:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", nargs="?", default="runs/gpu-check")
    p.add_argument("--dry-run", action="store_true", help="rehearse without a GPU (GPU stages stubbed)")
    p.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", DEFAULT_BUDGET_S)),
                   help=f"seconds for the whole check (default {DEFAULT_BUDGET_S}, or $GPU_CHECK_BUDGET_S)")
    p.add_argument("--only", default=None, help="comma-separated stage names to run (env always runs)")
    args = p.parse_args(argv)

    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in OUT_FILES:  # a previous run's files would read as this run's
        (out / name).unlink(missing_ok=True)
    own_work = not os.environ.get("GPU_CHECK_WORK")
    work = Path(os.environ.get("GPU_CHECK_WORK") or tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["GPU_CHECK_WORK"] = str(work)
    runner = Runner(out, work, args.budget, args.dry_run)
    stages = plan(sys.executable, out, args.dry_run)
    if args.only:
        wanted = set(args.only.split(",")) | {"env"}
        unknown = wanted - {s.name for s in stages}
        if unknown:
            p.error(f"--only: unknown stage(s) {', '.join(sorted(unknown))}; "
                    f"stages: {', '.join(s.name for s in stages)}")
        stages = [s for s in stages if s.name in wanted]

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    runner.say(f"GPU check{' (dry run)' if args.dry_run else ''}: {len(stages)} stages, budget {args.budget:.0f} s, "
               f"out {out}, work {work}")
    try:
        for stage in stages:
            runner.run(stage)
    except KeyboardInterrupt as why:
        runner.kill()
        runner.records.append({"name": runner.current or "(between stages)", "status": "interrupted",
                               "seconds": 0.0, "limit_s": 0,
                               "reason": f"the check itself was stopped ({why or 'SIGINT'})"})
        print("interrupted: the stages that finished are in summary.json", file=sys.stderr)
    data = runner.write_summary(final=True)
    text = runner.screen(data)
    (out / "summary.txt").write_text(text + "\n")
    print("\n" + text, flush=True)
    if own_work and not os.environ.get("GPU_CHECK_KEEP_WORK"):
        shutil.rmtree(work, ignore_errors=True)  # the random-init model folder alone is 3 GB
    return data["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
