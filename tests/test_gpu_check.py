"""The GPU check (scripts/gpu_check.sh) rehearsed without a GPU: the stage runner, the time
limits, the JSON and the summary (dry run), the no-GPU refusal of a real run, and the stage bodies
themselves at toy size on the CPU (the same code the GPU runs at full size)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GPU_STAGES = ["build", "pytest_gpu", "bench_cascade", "pytest_kernels", "bench_loss", "bench_sampler", "step_lora",
              "step_4bit"]


def load_runner():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def run_check(tmp_path, *args, timeout=90):
    env = {k: v for k, v in os.environ.items() if k not in ("GPU_CHECK_WORK", "GRPO_FAST_WHEELS", "TRITON_INTERPRET")}
    env.update(PYTHON=sys.executable, GPU_CHECK_WORK=str(tmp_path / "work"))
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=tmp_path)


def test_dry_run_records_every_stage_and_the_timeout(tmp_path):
    out = tmp_path / "out"
    proc = run_check(tmp_path, "--dry-run", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"] and summary["dry_run"] and summary["exit_code"] == 0
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == ["env", "wheels", *GPU_STAGES, "probe_timeout", "probe_fail"]
    assert all(s["status"] in ("pass", "fail", "timeout", "skipped") for s in stages.values())
    assert stages["env"]["status"] == "pass" and stages["env"]["result"]["python"]
    assert summary["env"]["cuda_available"] is False and summary["env"]["packages"]["torch"]
    for name in GPU_STAGES:  # the stand-ins went through the runner and wrote their JSON
        assert stages[name]["status"] == "skipped", stages[name]
        assert stages[name]["reason"] == stages[name]["result"]["skipped"] == "no GPU (dry run)"
    probe = stages["probe_timeout"]
    assert probe["status"] == "timeout" and probe["as_expected"] and probe["exit_code"] is None
    assert probe["limit_s"] == 1 and probe["seconds"] < 10  # killed at its limit, not after the 30 s sleep
    assert probe["result"]["partial"].startswith("written before the hang")  # its JSON survived the kill
    assert stages["probe_fail"]["status"] == "fail" and stages["probe_fail"]["exit_code"] == 3
    # One line per stage, appended as each ended; at most 8 files come back from a GPU session.
    lines = (out / "stages.jsonl").read_text().splitlines()
    assert [json.loads(x)["name"] for x in lines] == list(stages)
    assert len(list(out.iterdir())) <= 8 and all(p.is_file() for p in out.iterdir())
    screen = (out / "summary.txt").read_text()
    assert screen.strip() in proc.stdout and len(screen.splitlines()) < 40
    for name in stages:
        assert name in screen
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").glob("model-*"))


def test_real_run_without_a_gpu_skips_the_gpu_stages_and_exits_2(tmp_path):
    out = tmp_path / "out"
    proc = run_check(tmp_path, "--only", "build,bench_loss", str(out))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == ["env", "build", "bench_loss"]
    assert stages["build"]["status"] == "skipped" and "no CUDA device" in stages["build"]["reason"]


def test_budget_and_junit_parsing(tmp_path):
    gc = load_runner()
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="a" name="ok"/>'
                   '<testcase classname="a" name="bad"><failure message="x"/></testcase>'
                   '<testcase classname="b" name="err"><error message="y"/></testcase>'
                   '<testcase classname="b" name="skip"><skipped/></testcase></testsuite></testsuites>')
    assert gc.junit_counts(xml) == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1,
                                    "failing": ["a::bad", "b::err"]}
    assert "did not finish" in gc.junit_counts(tmp_path / "missing.xml")["error"]
    # A stage is not started when less than MIN_STAGE_S of the budget is left.
    runner = gc.Runner(tmp_path, tmp_path / "w", budget_s=gc.MIN_STAGE_S - 1, dry_run=True)
    rec = runner.run(gc.Stage("late", "never starts", 10, [sys.executable, "-c", "pass"], gpu=False))
    assert rec["status"] == "skipped" and rec["reason"].startswith("budget")
    runner.log.close()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["bench-loss", "bench-sampler", "bench-cascade", "step"])
def test_stage_bodies_at_toy_size_on_cpu(tmp_path, stage):
    """The GPU stages' own code, end to end at --tiny size: what the GPU runs at full size."""
    result = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(GPU_CHECK_WORK=str(tmp_path / "work"), PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_stages.py"), stage, "--tiny",
                           "--result", str(result)], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    data = json.loads(result.read_text())
    assert data["figures"], data
    if stage == "step":
        assert data["step"]["time/step_s"] > 0 and data["step"]["loss"] == data["step"]["loss"]
    else:
        assert data["bench"]["complete"]
