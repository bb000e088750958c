"""CLI smoke tests: train / eval / sample on a tiny model through `grpo_fast.cli.main`, the
console script's entry point, and clean one-line errors for bad configs."""

import pytest

from grpo_fast import cli
from grpo_fast.config import DEFAULT_JOB, load_config
from test_train_loop import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_cli"))


def _common(tiny, out):
    return ["--model.name_or_path", str(tiny), "--output_dir", str(out), "--max_steps", "1",
            "--prompts_per_step", "2", "--num_generations", "2", "--max_completion_length", "4",
            "--eval_size", "3", "--train_size", "10", "--backend", "hf", "--progress", "false", "--r", "2"]


def test_train_eval_sample(tiny, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train:\n  learning_rate: 1.0e-3\nrewards:\n  funcs: [accuracy, overlong]\n")
    assert cli.main(["train", "--config", str(cfg), *_common(tiny, tmp_path / "run")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("eval accuracy: before ") and "-> after" in out[-1]
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.train.learning_rate == 1e-3 and saved.rewards.funcs == ["accuracy", "overlong"]

    assert cli.main(["eval", "--adapter", str(tmp_path / "run" / "adapter"), *_common(tiny, tmp_path / "e")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("eval accuracy: ")

    assert cli.main(["sample", "--prompt", "What is 1 + 2?", "--n", "2", *_common(tiny, tmp_path / "s")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[0] (")


def test_resume_flag(tiny, tmp_path, capsys):
    args = ["train", *_common(tiny, tmp_path / "run"), "--eval_before", "false"]
    assert cli.main(args) == 0
    assert cli.main([*args, "--max_steps", "2", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_bad_config_is_one_clear_line(tmp_path, capsys):
    assert cli.main(["train", "--loss_type", "ppo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: loss.loss_type: must be one of") and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampling:\n  num_generations: 1\n")
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert "sampling.num_generations" in capsys.readouterr().err


def test_help_and_unknown_command(capsys):
    assert cli.main(["--help"]) == 0
    assert "grpo-fast train" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2


def test_default_job_config_matches_the_example():
    """`grpo-fast train` with no arguments and examples/cpu_default.yaml are the same job."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "cpu_default.yaml"
    assert load_config(example) == load_config(None, base=DEFAULT_JOB)
    job = load_config(None, base=DEFAULT_JOB)
    assert job.model.name_or_path is None and job.data.task == "arithmetic" and job.model.device == "auto"


def test_gpu_example_config_is_valid():
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "gsm8k_qwen2.5_1.5b_4bit.yaml"
    cfg = load_config(example)
    assert cfg.model.load_in_4bit and cfg.data.format == "gsm8k" and cfg.sampling.num_generations == 8
