"""report_to: the JSONL files, TensorBoard, W&B (offline run files) and trackio (local store), all
offline; plus the errors for an unknown tracker and a missing package."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from grpo_fast.errors import ConfigError
from grpo_fast.train.trackers import make_trackers, parse_report_to, resolve_report_to

# TRL's metric names, slashes included, and a non-finite value that must never reach a file as NaN
METRICS = {"reward": 0.5, "reward_std": 0.25, "rewards/accuracy/mean": 0.75, "clip_ratio/low_mean": 0.0,
           "completions/mean_length": 12.0, "kl": float("nan"), "nonfinite_updates": 0}
ROWS = [{"prompt": "What is 1 + 2?", "completion": "3", "reward": 1.0, "rewards/accuracy": 1.0, "advantage": 0.5},
        {"prompt": [{"role": "user", "content": "2 + 2?"}], "completion": "5", "reward": float("nan"),
         "rewards/accuracy": None, "advantage": -0.5}]


def _log_run(trackers):
    trackers.log(1, METRICS)
    trackers.log_completions(1, ROWS)
    trackers.log(2, {**METRICS, "reward": 0.875})
    trackers.close()


# ---------------------------------------------------------------- report_to's forms and errors


@pytest.mark.parametrize("value, want", [
    (None, ["tensorboard"]), ("none", []), ([], []), ("jsonl", []), (["jsonl", "tensorboard"], ["tensorboard"]),
    ("wandb", ["wandb"]), ("trackio,wandb", ["wandb", "trackio"]),
    (["WandB", " tensorboard "], ["tensorboard", "wandb"]), (["trackio,tensorboard"], ["tensorboard", "trackio"]),
    ("all", ["all"]),
])
def test_report_to_forms(value, want):
    assert parse_report_to(value) == want


@pytest.mark.parametrize("value, match", [
    ("mlflow", "report_to: 'mlflow' is not a tracker grpo-fast supports; choose from 'jsonl'"),
    (["none", "wandb"], "report_to: 'none' cannot be combined"),
    (["all", "wandb"], "report_to: 'all' cannot be combined"),
    (3, "report_to: expected a name or a list of names"),
])
def test_report_to_errors(value, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        parse_report_to(value)
    with pytest.raises(ConfigError, match=match):
        make_trackers(value, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("name", ["wandb", "trackio", "tensorboard"])
def test_missing_package_names_report_to_and_the_install(name, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    with pytest.raises(ConfigError, match=rf"report_to: '{name}' needs the {name} package, which is not installed: "
                                          rf"pip install"):
        make_trackers([name], tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing opened before the check
    assert name not in resolve_report_to("all")  # "all" = the installed ones, as in TRL


# ---------------------------------------------------------------- JSONL + TensorBoard


def test_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trackers = make_trackers(["tensorboard"], tmp_path)
    assert trackers.names == ["jsonl", "tensorboard"]
    _log_run(trackers)

    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c}"))
            for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["rewards/accuracy/mean"] == 0.75 and rows[0]["kl"] is None and rows[1]["reward"] == 0.875
    done = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c}"))
            for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert done[0] == {"step": 1, **ROWS[0]}
    assert done[1]["prompt"] == ROWS[1]["prompt"] and done[1]["reward"] is None

    acc = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    tags = acc.Tags()
    assert {"reward", "rewards/accuracy/mean", "clip_ratio/low_mean", "completions/mean_length"} <= set(tags["scalars"])
    assert "kl" not in tags["scalars"]  # non-finite: not plotted
    assert [(e.step, e.value) for e in acc.Scalars("reward")] == [(1, 0.5), (2, 0.875)]
    text = acc.Tensors("completions/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "What is 1 + 2?" in text and "user: 2 + 2?" in text and "**reward** 1.000" in text


def test_append_continues_the_files_and_tensorboard_purges(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = make_trackers("tensorboard", tmp_path)
    for step in (1, 2, 3):
        first.log(step, {"reward": float(step)})
    first.close()
    # resumed from checkpoint 2: the loop truncates the JSONL files, TensorBoard purges step 3 on
    resumed = make_trackers("tensorboard", tmp_path, append=True, purge_step=3)
    resumed.log(3, {"reward": 30.0})
    resumed.close()
    assert [json.loads(r)["reward"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 30]
    acc = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_none_still_writes_the_run_record(tmp_path):
    trackers = make_trackers("none", tmp_path)
    assert trackers.names == ["jsonl"]
    _log_run(trackers)
    assert not (tmp_path / "tensorboard").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_tracker_that_fails_to_log_is_reported_once_and_the_run_goes_on(tmp_path):
    trackers = make_trackers("tensorboard", tmp_path)

    def boom(*args):
        raise OSError("disk on fire")

    trackers.trackers[1].log = boom
    trackers.log(1, METRICS)
    trackers.log(2, METRICS)
    assert trackers.take_notices() == ["report_to: tensorboard failed to log step 1 (OSError: disk on fire); "
                                       "metrics.jsonl has every step"]
    assert trackers.take_notices() == []
    trackers.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_metrics_logger_is_the_jsonl_and_tensorboard_trackers(tmp_path):
    from grpo_fast.train.metrics import MetricsLogger, read_metrics

    log = MetricsLogger(tmp_path, append=False, purge_step=None)
    assert log.names == ["jsonl", "tensorboard"]
    log.log(1, {"reward": 1.0})
    log.log_completions(1, ROWS[:1])
    log.close()
    assert read_metrics(tmp_path) == [{"step": 1, "reward": 1.0}]
    with MetricsLogger(tmp_path / "b", tensorboard=False) as bare:
        assert bare.names == ["jsonl"]


# ---------------------------------------------------------------- W&B, offline


def _wandb_records(path: Path):
    """The records of a .wandb file (W&B's LevelDB-style log: a 7-byte header, then 32 KiB blocks of
    chunks, each a 7-byte header crc32 / length / type and its bytes), as wandb's own protobufs."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    off, buf, block = 7, b"", 32768
    while off + 7 <= len(data):
        left = block - off % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            off += left
            continue
        _, length, kind = struct.unpack("<IHB", data[off:off + 7])
        if kind == 0:
            off += left
            continue
        chunk, off = data[off + 7:off + 7 + length], off + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record


def _wandb_history(run_dir: Path) -> tuple[dict, list[dict]]:
    (path,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + 30
    while True:  # run.finish() can return before wandb's service has written the file out
        records = list(_wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    config, history = {}, {}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):  # the config comes with the run record or in later updates
            updates = (r.run.config if kind == "run" else r.config).update
            config.update({u.key: json.loads(u.value_json) for u in updates})
        elif kind == "history":  # a step's values may come in more than one record
            row = {it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in r.history.item}
            history.setdefault(row["_step"], {}).update(row)
    return config, [history[s] for s in sorted(history)]


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in (("WANDB_DIR", "wandb-dir"), ("WANDB_CONFIG_DIR", "wandb-config"),
                     ("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_DATA_DIR", "wandb-data")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    return tmp_path / "wandb-dir"


def test_wandb_offline_writes_its_run_files(tmp_path, wandb_offline):
    out = tmp_path / "run"
    trackers = make_trackers(["wandb"], out, run_name="tiny", config={"loss": {"loss_type": "dapo"}, "seed": 3},
                             project="grpo-fast-tests")
    assert trackers.names == ["jsonl", "wandb"]
    _log_run(trackers)
    assert trackers.take_notices() == []

    run_id = (out / "wandb" / "run_id").read_text().strip()
    (run_dir,) = (wandb_offline / "wandb").glob(f"offline-run-*-{run_id}")
    config, history = _wandb_history(run_dir)
    assert config["seed"] == 3 and config["loss"] == {"loss_type": "dapo"}
    scalars = [h for h in history if "reward" in h]
    assert [h["_step"] for h in scalars] == [1, 2] and scalars[1]["reward"] == 0.875
    assert scalars[0]["rewards/accuracy/mean"] == 0.75 and scalars[0]["clip_ratio/low_mean"] == 0
    assert scalars[0]["completions/mean_length"] == 12 and "kl" not in scalars[0]  # NaN skipped
    assert scalars[0]["completions/_type"] == "table-file" and scalars[0]["completions/nrows"] == 2
    (table,) = (run_dir / "files" / "media" / "table").glob("completions_1_*.table.json")
    table = json.loads(table.read_text())
    assert table["columns"] == ["step", "prompt", "completion", "reward", "rewards/accuracy", "advantage"]
    assert table["data"][0] == [1, "What is 1 + 2?", "3", 1.0, 1.0, 0.5]
    assert table["data"][1][1] == "user: 2 + 2?" and table["data"][1][3] is None
    assert len(json.loads((out / "metrics.jsonl").read_text().splitlines()[0])) == len(METRICS) + 1


def test_wandb_resume_continues_the_same_run(tmp_path, wandb_offline):
    out = tmp_path / "run"
    first = make_trackers("wandb", out, project="grpo-fast-tests")
    first.log(1, {"reward": 1.0})
    first.close()
    run_id = (out / "wandb" / "run_id").read_text().strip()
    resumed = make_trackers("wandb", out, append=True, purge_step=2, project="grpo-fast-tests")
    resumed.log(2, {"reward": 2.0})
    resumed.close()
    runs = sorted((wandb_offline / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all((r / f"run-{run_id}.wandb").is_file() for r in runs)
    fresh = make_trackers("wandb", out, project="grpo-fast-tests")  # --overwrite: a new run
    fresh.close()
    assert (out / "wandb" / "run_id").read_text().strip() != run_id


# ---------------------------------------------------------------- trackio, local store


TRACKIO_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from test_trackers import METRICS, ROWS
    from grpo_fast.train.trackers import make_trackers

    out = sys.argv[2]
    t = make_trackers("trackio", out, run_name="tiny", config={"seed": 3}, project="grpo-fast-tests")
    assert t.names == ["jsonl", "trackio"], t.names
    t.log(1, METRICS)
    t.log_completions(1, ROWS)
    t.close()
    t = make_trackers("trackio", out, run_name="tiny", config={"seed": 3, "learning_rate": 2e-5}, append=True,
                      project="grpo-fast-tests")  # --resume, with a changed learning rate
    t.log(2, {**METRICS, "reward": 0.875})
    t.close()

    from trackio.sqlite_storage import SQLiteStorage
    print("RESULT " + json.dumps({
        "runs": [dict(r) for r in SQLiteStorage.get_run_records("grpo-fast-tests")],
        "logs": SQLiteStorage.get_logs("grpo-fast-tests", "tiny"),
        "config": SQLiteStorage.get_run_config("grpo-fast-tests", "tiny"),
    }, default=str))
""")


def test_trackio_writes_its_local_store(tmp_path):
    pytest.importorskip("trackio")
    # trackio reads TRACKIO_DIR when it is imported: a fresh process, so the store is this test's
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRACKIO_", "HF_TOKEN", "SYSTEM"))}
    env.update(TRACKIO_DIR=str(tmp_path / "store"), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", TRACKIO_SCRIPT, str(Path(__file__).parent), str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("RESULT ", 1)[1])

    assert sorted(p.name for p in (tmp_path / "store").glob("*.db")) == ["grpo-fast-tests.db"]
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.db"))
    assert [r["name"] for r in got["runs"]] == ["tiny"]  # the resume continued it
    assert got["config"]["seed"] == 3 and got["config"]["learning_rate"] == 2e-5  # the resumed run's config
    scalars = [r for r in got["logs"] if "reward" in r]
    assert [r["step"] for r in scalars] == [1, 2] and scalars[1]["reward"] == 0.875
    assert scalars[0]["rewards/accuracy/mean"] == 0.75 and scalars[0]["clip_ratio/low_mean"] == 0.0
    assert "kl" not in scalars[0]
    (table,) = [r["completions"] for r in got["logs"] if "completions" in r]
    assert table["_type"] == "trackio.table"
    assert table["_value"][0] == {"step": 1, "prompt": "What is 1 + 2?", "completion": "3", "reward": 1.0,
                                  "rewards/accuracy": 1.0, "advantage": 0.5}
    assert table["_value"][1]["prompt"] == "user: 2 + 2?"


def test_wandb_that_cannot_start_is_a_config_error(tmp_path, wandb_offline, monkeypatch):
    import wandb

    def no_login(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", no_login)
    with pytest.raises(ConfigError, match=r"^report_to: wandb could not start a run \(UsageError: No API key "
                                          r"configured.*\); run `wandb login`, or set WANDB_MODE=offline"):
        make_trackers(["tensorboard", "wandb"], tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["wandb"]  # the id only: no logs opened
