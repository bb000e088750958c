"""Checkpoints: an interrupted run resumed with --resume ends bit-identical to an uninterrupted
one (CPU), and a crash or kill -9 during a save never leaves `latest` naming a broken checkpoint."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from grpo_fast.train import checkpoint as ckpt
from grpo_fast.train import loop, rollout
from test_train_loop import make_tiny_model, tiny_config, tiny_rewards  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_ckpt"))


class Interrupt(Exception):
    pass


def _steps(out_dir):
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "reward" in r}


@pytest.mark.parametrize("extra", [{}, {"lora.lora_dropout": 0.1, "loss.num_iterations": 2, "loss.beta": 0.05,
                                        "train.micro_batch_size": 2}])
def test_resume_is_bit_exact(tiny, tmp_path, monkeypatch, extra):
    """Bit-exact on a fixed thread count: the adaptive one follows the machine's load (another
    process beside the test changed it mid-run, and a GEMM on other threads rounds otherwise)."""
    settings = {"train.max_steps": 4, "train.save_steps": 2, "train.eval_before": False, "data.eval_size": 2,
                "train.adaptive_threads": False, **extra}
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    loop.train(tiny_config(tiny, full_dir, **settings), echo=lambda *_: None)

    real = rollout.collect_rollout

    def interrupted(*args, **kwargs):
        if args[6] == 2:  # step index 2: checkpoint-2 has just been written
            raise Interrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(rollout, "collect_rollout", interrupted)
    with pytest.raises(Interrupt):
        loop.train(tiny_config(tiny, cut_dir, **settings), echo=lambda *_: None)
    assert ckpt.latest_checkpoint(cut_dir / "checkpoints").name == "checkpoint-2"
    monkeypatch.setattr(rollout, "collect_rollout", real)
    lines = []
    loop.train(tiny_config(tiny, cut_dir, **settings, **{"train.resume": True}), echo=lines.append)
    assert any("resumed from" in x and "step 2" in x for x in lines)

    a = load_file(str(full_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(cut_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full, cut = _steps(full_dir), _steps(cut_dir)
    for step in (3, 4):
        for key in ("reward", "loss", "grad_norm", "completions/mean_length", "learning_rate"):
            assert full[step][key] == cut[step][key], (step, key)


class FakeModel:
    def __init__(self, payload: bytes):
        self.payload = payload

    def save_pretrained(self, path):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "adapter_model.safetensors"), "wb") as f:
            f.write(self.payload)


class FakeStateful:
    def state_dict(self):
        return {"x": 1}


def test_crash_during_save_keeps_previous(tmp_path, monkeypatch):
    parts = dict(optimizer=FakeStateful(), scheduler=FakeStateful(), stream=FakeStateful())
    ckpt.save_checkpoint(tmp_path, 1, model=FakeModel(b"one"), trainer_state={}, **parts)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, model=FakeModel(b"two"), trainer_state={}, **parts)
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "checkpoint-1"
    assert (latest / "adapter" / "adapter_model.safetensors").read_bytes() == b"one"
    assert not (tmp_path / "checkpoint-2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # temp folder cleaned


def test_keeps_only_the_newest(tmp_path):
    parts = dict(optimizer=FakeStateful(), scheduler=FakeStateful(), stream=FakeStateful())
    for step in range(1, 5):
        ckpt.save_checkpoint(tmp_path, step, model=FakeModel(b"x"), trainer_state={}, keep=2, **parts)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]


def test_kill_9_during_saves(tmp_path):
    """A child process saves large checkpoints in a loop (continuing from `latest`, as a resumed
    run does); kill -9 it at several moments. The checkpoint `latest` names is always complete and
    holds the payload of its own step."""
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from test_checkpoint import FakeModel, FakeStateful
        from grpo_fast.train import checkpoint as ckpt
        latest = ckpt.latest_checkpoint({str(tmp_path)!r})
        step = json.loads((latest / "trainer_state.json").read_text())["step"] - 1 if latest else 0
        while True:
            step += 1  # the first save re-saves the latest step, like the end of a resumed finished run
            payload = str(step).encode() * 2_000_000
            ckpt.save_checkpoint({str(tmp_path)!r}, max(step, 1), model=FakeModel(payload), trainer_state={{}},
                                 optimizer=FakeStateful(), scheduler=FakeStateful(), stream=FakeStateful())
    """)
    seen = []
    for delay in (0.0, 0.05, 0.13, 0.21):
        before = ckpt.latest_checkpoint(tmp_path)
        proc = subprocess.Popen([sys.executable, "-c", script])
        deadline = time.time() + 120
        while ckpt.latest_checkpoint(tmp_path) == before and time.time() < deadline:
            time.sleep(0.01)  # wait until this child has completed a save
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        latest = ckpt.latest_checkpoint(tmp_path)
        assert latest is not None
        step = json.loads((latest / "trainer_state.json").read_text())["step"]
        data = (latest / "adapter" / "adapter_model.safetensors").read_bytes()
        assert data == str(step).encode() * 2_000_000
        assert (latest / "state.pt").is_file()
        seen.append(step)
    assert seen == sorted(seen) and seen[-1] > 1
