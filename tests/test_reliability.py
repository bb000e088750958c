"""No run is ever lost or silently corrupted: one test per defect of the reliability issue (each
failed before its fix), on the tiny random model of test_train_loop."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from grpo_fast import cli
from grpo_fast.config import load_config
from grpo_fast.errors import ConfigError, DataError, ResumeError, RunFolderError, TrainingStopped
from grpo_fast.train import checkpoint as ckpt
from grpo_fast.train import loop
from test_train_loop import make_tiny_model, tiny_config, tiny_rewards  # noqa: F401 (fixture)

QUIET = dict(echo=lambda *_: None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_rel"))


def run(tiny, out, echo=None, **extra):
    settings = {"train.eval_before": False, "data.eval_size": 2, **extra}
    return loop.train(tiny_config(tiny, out, **settings), echo=echo or (lambda *_: None))


def steps_logged(out):
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
            if "reward" in json.loads(x)]


def adapter(out_or_ckpt):
    return load_file(str(Path(out_or_ckpt) / "adapter" / "adapter_model.safetensors"))


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- 1, 2, 7, 14: resume finds and refuses


def test_resume_refuses_max_steps_below_the_checkpoint(tiny, tmp_path):
    run(tiny, tmp_path, **{"train.max_steps": 3})
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    metrics = (tmp_path / "metrics.jsonl").read_text()
    for max_steps in (1, 2):
        with pytest.raises(ResumeError, match=r"train.max_steps is \d, but the checkpoint is at step 3.*set it to 3 "
                                              r"to finish that run"):
            run(tiny, tmp_path, **{"train.max_steps": max_steps, "train.resume": True})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before  # nothing deleted
    assert (tmp_path / "metrics.jsonl").read_text() == metrics  # nor rewritten


def _final_eval_rows(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["step"] == 3 and "reward" not in r]


def test_resume_at_max_steps_runs_only_the_end_of_a_run_killed_after_its_last_save(tiny, tmp_path):
    """Killed after the final checkpoint (in the final eval, merge or plots), --resume with the same
    max_steps takes no step: it redoes the run's end, and the final eval is logged once."""
    run(tiny, tmp_path, **{"train.max_steps": 3})
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    weights = adapter(tmp_path)
    assert len(_final_eval_rows(tmp_path)) == 1
    # as if killed before the end: the final eval's row and the plot never written
    kept = [x for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "reward" in x]
    (tmp_path / "metrics.jsonl").write_text("".join(x + "\n" for x in kept))
    (tmp_path / "training.png").unlink()
    assert _final_eval_rows(tmp_path) == []
    for _ in range(2):  # once after the kill, once more over the finished run: the same end
        lines = []
        result = run(tiny, tmp_path, echo=lines.append, **{"train.max_steps": 3, "train.resume": True})
        assert any("train.max_steps=3: no step is left" in x for x in lines)
        assert result.steps == 3 and steps_logged(tmp_path) == [1, 2, 3]
        assert len(_final_eval_rows(tmp_path)) == 1
        assert (tmp_path / "training.png").is_file()
        assert same_weights(adapter(tmp_path), weights)
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == checkpoints


def test_resume_falls_back_past_a_missing_or_corrupt_latest(tiny, tmp_path):
    run(tiny, tmp_path, **{"train.max_steps": 2, "train.save_steps": 1})
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    good = adapter(root / "checkpoint-1")
    # checkpoint-2 truncated (a half-written adapter): it is skipped by name, checkpoint-1 used.
    weights = root / "checkpoint-2" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    lines = []
    run(tiny, tmp_path, echo=lines.append, **{"train.max_steps": 3, "train.resume": True})
    assert any("skipped checkpoint-2: adapter/adapter_model.safetensors has 100 bytes" in x for x in lines)
    assert any("resumed from" in x and "step 1" in x for x in lines)
    assert steps_logged(tmp_path) == [1, 2, 3]  # step 2 of the first run dropped, then redone: no duplicate
    # `latest` naming a folder that is gone: the newest complete one is used, never a fresh start.
    (root / "latest").write_text("checkpoint-99")
    lines.clear()
    run(tiny, tmp_path, echo=lines.append, **{"train.max_steps": 4, "train.resume": True})
    assert any("resumed from" in x and "step 3" in x for x in lines)
    assert steps_logged(tmp_path) == [1, 2, 3, 4]
    assert not same_weights(good, adapter(tmp_path))


def test_resume_refuses_to_start_fresh_over_broken_checkpoints(tiny, tmp_path):
    run(tiny, tmp_path, **{"train.max_steps": 1})
    (tmp_path / "checkpoints" / "checkpoint-1" / "state.pt").write_bytes(b"x")
    metrics = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ResumeError, match=r"no usable checkpoint.*checkpoint-1: state.pt has 1 bytes.*--overwrite"):
        run(tiny, tmp_path, **{"train.max_steps": 2, "train.resume": True})
    assert (tmp_path / "metrics.jsonl").read_text() == metrics and (tmp_path / "checkpoints" / "checkpoint-1").is_dir()
    # run files but no checkpoint at all (killed before its first save): not silently restarted either
    (tmp_path / "checkpoints").rename(tmp_path / "elsewhere")
    with pytest.raises(ResumeError, match="no checkpoint to continue from"):
        run(tiny, tmp_path, **{"train.max_steps": 2, "train.resume": True})


def test_corrupt_checkpoint_without_manifest_names_the_file(tiny, tmp_path):
    """A checkpoint from before manifests (or bit rot the sizes miss): the loader names the file."""
    run(tiny, tmp_path, **{"train.max_steps": 1})
    c = tmp_path / "checkpoints" / "checkpoint-1"
    (c / "manifest.json").unlink()
    (c / "state.pt").write_bytes(b"not a torch file")
    with pytest.raises(ResumeError, match=r"cannot load .*checkpoint-1/state.pt"):
        run(tiny, tmp_path, **{"train.max_steps": 2, "train.resume": True})


# ---------------------------------------------------------------- 4, 10: options on resume


def test_resume_applies_a_new_learning_rate_and_refuses_a_new_lora_shape(tiny, tmp_path):
    run(tiny, tmp_path, **{"train.max_steps": 2, "train.lr_scheduler_type": "constant"})
    config_before = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ResumeError, match=r"lora.r was 4, now 8.*must keep lora.r"):
        run(tiny, tmp_path, **{"train.max_steps": 3, "train.resume": True, "lora.r": 8})
    assert (tmp_path / "config.yaml").read_text() == config_before  # written only after validation
    lines = []
    run(tiny, tmp_path, echo=lines.append,
        **{"train.max_steps": 3, "train.resume": True, "train.learning_rate": 0.5, "train.lr_scheduler_type": "constant"})
    assert any("applied on resume: train.learning_rate: 0.001 -> 0.5" in x for x in lines)
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
            if "learning_rate" in r}
    assert rows[2]["learning_rate"] == pytest.approx(1e-3) and rows[3]["learning_rate"] == pytest.approx(0.5)
    assert load_config(tmp_path / "config.yaml").train.learning_rate == 0.5


# ---------------------------------------------------------------- 3: interrupts and the final save


def test_unsavable_checkpoint_still_leaves_the_adapter(tiny, tmp_path, monkeypatch):
    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_checkpoint", disk_full)
    with pytest.raises(OSError):
        run(tiny, tmp_path, **{"train.max_steps": 1})
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()  # written first


def _cli_env(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _cli_args(tiny, out, *extra):
    return [sys.executable, "-m", "grpo_fast.cli", "train", "--model.name_or_path", str(tiny), "--output_dir", str(out),
            "--prompts_per_step", "2", "--num_generations", "3", "--max_completion_length", "6", "--train_size", "20",
            "--eval_size", "2", "--backend", "hf", "--progress", "false", "--r", "4", "--lora_alpha", "8",
            "--learning_rate", "1e-3", "--seed", "1", "--eval_before", "false", *extra]


def _wait_for_step(out, step, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").is_file() and step in steps_logged(out):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"step {step} never logged")


@pytest.mark.slow
def test_ctrl_c_saves_the_finished_steps_and_says_how_to_resume(tiny, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli_args(tiny, out, "--max_steps", "50"), env=_cli_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(out, 1, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, (stdout, stderr)
    done = steps_logged(out)[-1]
    assert "SIGINT: finishing the current step" in stdout
    assert f"stopped after step {done} of 50" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert ckpt.latest_checkpoint(out / "checkpoints").name == f"checkpoint-{done}"
    assert same_weights(adapter(out), adapter(out / "checkpoints" / f"checkpoint-{done}"))


def test_second_ctrl_c_exits_at_once():
    from grpo_fast.train.interrupts import StopRequests

    heard = []
    previous = signal.getsignal(signal.SIGINT)
    with StopRequests(heard.append) as stops:
        os.kill(os.getpid(), signal.SIGINT)
        assert stops.requested == "SIGINT" and stops.exit_code == 130 and "Ctrl-C again" in heard[0]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous  # restored


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_is_bit_exact(tiny, tmp_path):
    """Several kill -9s at random times (seeded) of a CLI run that saves every step, each followed
    by --resume: the final adapter equals an uninterrupted run's, bit for bit (CPU)."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    common = ("--max_steps", "8", "--save_steps", "1")
    subprocess.run(_cli_args(tiny, full, *common), env=_cli_env(tmp_path), check=True, capture_output=True)
    rng = np.random.default_rng(7)
    kills = 0
    for attempt in range(6):
        # Killed before its first save, a run has nothing to resume: it starts afresh, explicitly.
        started = cut.exists() and any(cut.iterdir())
        flag = "--resume" if ckpt.checkpoints(cut / "checkpoints") else "--overwrite" if started else None
        extra = common + ((flag,) if flag else ())
        proc = subprocess.Popen(_cli_args(tiny, cut, *extra), env=_cli_env(tmp_path),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if kills < 3:
            target = attempt + 1  # let it get a little further each time
            _wait_for_step(cut, target, proc)
            time.sleep(float(rng.uniform(0.0, 0.6)))
            if proc.poll() is None:
                proc.kill()
                kills += 1
                proc.wait()
                continue
            # it finished before the kill came: that run must have succeeded, as a resumed one
        proc.wait(timeout=300)
        assert proc.returncode == 0, proc.stderr.read()
        break
    else:
        raise AssertionError("no run finished")
    # A kill can land anywhere, the run's end after the last checkpoint included (the next
    # --resume then only finishes the run); a fast run may even finish before the third kill.
    assert kills >= 1
    assert same_weights(adapter(full), adapter(cut))
    assert steps_logged(cut) == list(range(1, 9))


# ---------------------------------------------------------------- 6, 14: the run folder


def test_existing_run_folder_needs_resume_or_overwrite(tiny, tmp_path):
    run(tiny, tmp_path, **{"train.max_steps": 1})
    with pytest.raises(RunFolderError, match=r"already holds a run \(config.yaml, metrics.jsonl.*--resume.*--overwrite"):
        run(tiny, tmp_path, **{"train.max_steps": 1})
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "checkpoints" / ".tmp-checkpoint-7-abc").mkdir()
    run(tiny, tmp_path, **{"train.max_steps": 2, "train.overwrite": True})
    assert steps_logged(tmp_path) == [1, 2] and (tmp_path / "notes.txt").read_text() == "mine"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    (tmp_path / "checkpoints" / ".tmp-checkpoint-9-x").mkdir()  # a save killed mid-way
    lines = []
    run(tiny, tmp_path, echo=lines.append, **{"train.max_steps": 3, "train.resume": True})
    assert any("removed .tmp-checkpoint-9-x" in x for x in lines)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_output_dir_that_is_a_file_is_refused_before_loading(tiny, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RunFolderError, match="is a file"):
        run(tiny, f)


# ---------------------------------------------------------------- 8: non-finite


def test_non_finite_numbers_are_refused_in_configs():
    for key in ("loss.beta", "train.learning_rate", "loss.epsilon", "train.time_budget_s"):
        for value in ("inf", "nan", "-inf"):
            with pytest.raises(ConfigError, match=rf"{key}: must be a finite number"):
                load_config(None, {key: value})
    with pytest.raises(ConfigError, match="rewards.weights"):
        load_config(None, {"rewards.funcs": "accuracy", "rewards.weights": "nan"})


def test_non_finite_losses_skip_the_update_then_stop_the_run(tiny, tmp_path, monkeypatch):
    from grpo_fast.train import update

    real = update.policy_loss
    monkeypatch.setattr(update, "policy_loss", lambda *a, **k: (lambda out: (out[0] * float("nan"), out[1]))(real(*a, **k)))
    lines = []
    with pytest.raises(TrainingStopped, match=r"steps 1-2 all had a non-finite loss"):
        run(tiny, tmp_path, echo=lines.append, **{"train.max_steps": 5, "train.max_nonfinite_steps": 2})
    assert any("non-finite loss or gradient: update skipped" in x for x in lines)
    weights = adapter(tmp_path)
    assert all(bool(torch.isfinite(v).all()) for v in weights.values())
    assert all(float(v.abs().max()) == 0 for k, v in weights.items() if "lora_B" in k)  # never updated
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_updates"] for r in rows if "reward" in r] == [1, 1]
    assert all(r["loss"] is None for r in rows if "reward" in r)  # null, not a bare NaN


def test_empty_batch_loss_is_zero_not_nan():
    from grpo_fast.loss import reference_grpo_loss
    from grpo_fast.ops import fused_grpo_loss

    for loss_type in ("grpo", "dr_grpo", "sapo"):
        args = dict(hidden=torch.randn(0, 3, 4), weight=torch.randn(5, 4), targets=torch.zeros(0, 3, dtype=torch.long),
                    mask=torch.zeros(0, 3), advantages=torch.zeros(0), loss_type=loss_type)
        assert float(reference_grpo_loss(**args)[0]) == 0.0 and float(fused_grpo_loss(**args)[0]) == 0.0


# ---------------------------------------------------------------- 9, 11: sampler fallback, reward time limits


def test_bad_kv_budget_is_a_config_error_and_a_refused_sampler_is_said():
    with pytest.raises(ConfigError, match="sampling.kv_budget: '2 gigs' is not understood"):
        load_config(None, {"sampling.kv_budget": "2 gigs"})
    from transformers import GPT2Config, GPT2LMHeadModel

    from grpo_fast.train.generation import Generator

    gen = Generator(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20)), None)
    notes = gen.take_notices()
    assert gen.backend == "hf" and len(notes) == 1 and "using HF generate, which is slower" in notes[0]


def test_a_reward_that_never_returns_times_out():
    from grpo_fast.rewards import RewardError, RewardSet, compute_rewards

    def hangs(prompts, completions, **_):
        time.sleep(30)

    args = (["p"] * 3, ["c"] * 3, {})
    t0 = time.time()
    with pytest.raises(RewardError, match=r"'hangs' did not return within rewards.timeout_s=0.2 s"):
        compute_rewards(RewardSet(["hangs"], [hangs], [1.0], "raise", 0.2), *args)
    result = compute_rewards(RewardSet(["hangs"], [hangs], [1.0], "zero", 0.2), *args)
    assert result.errors == {"hangs": 3} and result.rewards.tolist() == [[0.0]] * 3
    assert time.time() - t0 < 5  # once per batch, not per sample


def test_reward_failures_reach_the_console(tiny, tmp_path, monkeypatch):
    import tiny_rewards

    monkeypatch.setattr(tiny_rewards, "first_token_even", lambda *a, **k: 1 / 0, raising=False)
    lines = []
    run(tiny, tmp_path, echo=lines.append, **{"train.max_steps": 1, "rewards.on_reward_error": "skip"})
    assert any("reward functions failed ('tiny_rewards:first_token_even' on 6 of 6 completions" in x for x in lines)


# ---------------------------------------------------------------- 5: the held-out split


def test_held_out_split_of_a_small_file_is_capped_and_said(tmp_path):
    from grpo_fast.config import DataConfig
    from grpo_fast.data import load_splits

    path = tmp_path / "ten.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n" for i in range(10)))
    lines = []
    train, evals = load_splits(DataConfig(path=str(path)), echo=lines.append)
    assert (len(train), len(evals)) == (9, 1)
    assert "ten.jsonl has 10 rows: 9 train, 1 held out for eval" in lines[0]
    train, evals = load_splits(DataConfig(path=str(path), eval_fraction=0.5, eval_size=100), echo=lines.append)
    assert (len(train), len(evals)) == (5, 5)  # never more than half


def test_fewer_prompts_than_a_step_warns(tiny, tmp_path):
    lines = []
    run(tiny, tmp_path, echo=lines.append, **{"train.max_steps": 1, "data.train_size": 1, "train.prompts_per_step": 2})
    assert any("1 training prompts < train.prompts_per_step=2" in x for x in lines)


# ---------------------------------------------------------------- 12, 13: one clear line per user error


def _cli(args, capsys):
    """(rc, stderr). Third-party output (transformers' progress bars and warnings) may precede
    ours; what we print for a user error is one line, the last, starting with 'error: '."""
    rc = cli.main(args)
    return rc, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("error: ")]
    assert len(ours) == 1 and lines[-1] == ours[0] and "Traceback" not in err, err
    return ours[0]


@pytest.fixture
def user_errors(tiny, tmp_path):
    """(name, argv, expected fragment): every user error of the issue's list, through the CLI."""
    d = tmp_path
    (d / "bad.yaml").write_text("train:\n  max_steps: [1\n")
    (d / "lines.jsonl").write_text('{"prompt": "a"}\n[1, 2]\n')
    (d / "latin1.jsonl").write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    (d / "ok.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "answer": "1"}) + "\n" for i in range(6)))
    (d / "a_file").write_text("x")
    (d / "empty_model").mkdir()
    (d / "folder.yaml").mkdir()
    base = ["train", "--model.name_or_path", str(tiny), "--backend", "hf", "--progress", "false",
            "--eval_before", "false", "--max_steps", "1", "--prompts_per_step", "2", "--num_generations", "2",
            "--max_completion_length", "4", "--r", "4", "--lora_alpha", "8"]
    out = ["--output_dir", str(d / "run")]
    return [
        ("malformed YAML", ["train", "--config", str(d / "bad.yaml")], f"{d / 'bad.yaml'} line 3, column 1 is not valid YAML"),
        ("missing --config", ["train", "--config", str(d / "nope.yaml")], "--config: no such file"),
        ("folder --config", ["train", "--config", str(d / "folder.yaml")], "is a folder, not a YAML file"),
        ("missing model folder", [*base, *out, "--model.name_or_path", str(d / "missing")],
         "model.name_or_path: '" + str(d / "missing") + "' is not a local model folder"),
        ("empty model folder", [*base, *out, "--model.name_or_path", str(d / "empty_model")], "has no config.json"),
        ("missing gguf", [*base, *out, "--model.gguf_file", str(d / "m.gguf")], "model.gguf_file: no GGUF file 'm.gguf'"),
        ("JSONL line not an object", [*base, *out, "--data.path", str(d / "lines.jsonl")],
         "data.path: lines.jsonl line 2 is a JSON list, not an object"),
        ("non-UTF-8 data", [*base, *out, "--data.path", str(d / "latin1.jsonl")], "latin1.jsonl line 2 is not UTF-8"),
        ("missing eval file", [*base, *out, "--data.path", str(d / "ok.jsonl"), "--data.eval_path", str(d / "no.jsonl")],
         "data.eval_path: '" + str(d / "no.jsonl") + "' is not found"),
        ("template names a missing column", [*base, *out, "--data.path", str(d / "ok.jsonl"),
                                              "--data.prompt_template", "{prompt} {context}"],
         "data.prompt_template: names column 'context', which row 0 does not have (columns: answer, prompt)"),
        ("output_dir is a file", [*base, "--output_dir", str(d / "a_file")], "is a file, not a folder"),
        ("bad kv_budget", [*base, *out, "--kv_budget", "lots"], "sampling.kv_budget: 'lots' is not understood"),
        ("infinite beta", [*base, *out, "--loss.beta", "inf"], "loss.beta: must be a finite number"),
        ("reward error", [*base, *out, "--rewards.funcs", "rel_rewards_boom:boom"], "reward function 'rel_rewards_boom:boom' raised ZeroDivisionError"),
    ]


def test_every_user_error_is_one_line(user_errors, capsys, monkeypatch, tmp_path):
    (tmp_path / "rel_rewards_boom.py").write_text("def boom(prompts, completions, **_):\n    return 1 / 0\n")
    monkeypatch.chdir(tmp_path)  # a reward module in the working directory needs no PYTHONPATH
    monkeypatch.delenv("PYTHONPATH", raising=False)
    for name, argv, fragment in user_errors:
        rc, err = _cli(argv, capsys)
        assert rc == 2, (name, err)
        assert fragment in _one_error_line(err), (name, err)


def test_debug_shows_the_traceback(capsys, tmp_path):
    rc, err = _cli(["train", "--config", str(tmp_path / "nope.yaml"), "--debug"], capsys)
    assert rc == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: --config: no such file")


def test_resume_with_another_lora_shape_is_one_line(tiny, tmp_path, capsys):
    base = ["train", "--model.name_or_path", str(tiny), "--backend", "hf", "--progress", "false", "--eval_before",
            "false", "--max_steps", "1", "--prompts_per_step", "2", "--num_generations", "2",
            "--max_completion_length", "4", "--r", "4", "--lora_alpha", "8", "--output_dir", str(tmp_path / "run")]
    assert cli.main(base) == 0
    rc, err = _cli([*base, "--max_steps", "2", "--r", "8", "--resume"], capsys)
    assert rc == 2 and "lora.r was 4, now 8" in _one_error_line(err)


def test_version_and_train_help(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("grpo-fast 0.")
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--resume", "--overwrite", "--merge", "--section.field"))


# ---------------------------------------------------------------- 14: the rest


def test_metrics_never_hold_bare_nan(tmp_path):
    from grpo_fast.train.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log(1, {"a": float("nan"), "b": float("inf"), "c": 1.5})
    log.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert row == {"step": 1, "a": None, "b": None, "c": 1.5}


def test_sampler_accepts_numpy_ints_and_tensors():
    from grpo_fast.sampler import Sampler, SamplingParams
    from test_sampler import tiny_model

    sampler = Sampler(tiny_model("llama"), None, block_size=4, kv_budget="512 tokens")
    params = SamplingParams(max_tokens=3, temperature=0.0)
    want = [c.token_ids for g in sampler.generate([[4, 5, 6], [7, 8, 9]], params) for c in g.completions]
    for prompts in ([np.array([4, 5, 6]), [np.int64(7), np.int32(8), 9]], torch.tensor([[4, 5, 6], [7, 8, 9]])):
        assert [c.token_ids for g in sampler.generate(prompts, params) for c in g.completions] == want
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\] holds 'x'"):
        sampler.generate([[4, 5], [6, "x"]], params)
    with pytest.raises(ValueError, match=r"prompt_token_ids\[0\] must be a list of token ids, got str"):
        sampler.generate(["hello"], params)


def test_data_errors_are_data_errors(tmp_path):
    from grpo_fast.data import read_table

    with pytest.raises(DataError, match="data.path: '.*' is not found"):
        read_table(tmp_path / "none.jsonl")
