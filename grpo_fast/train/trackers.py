"""Where a run's metrics go: `report_to`, as in TRL.

The run folder always gets metrics.jsonl (one JSON object per logged step) and completions.jsonl:
they are the run's own record, read by plot_run, by --resume (which truncates them to the
checkpoint's step) and by tests, so they are not optional. `report_to` names the trackers to feed
besides them:

    tensorboard   out_dir/tensorboard (events; purge_step drops an interrupted run's later steps)
    wandb         a W&B run whose id is kept in out_dir/wandb/run_id, so --resume continues it;
                  its files go to $WANDB_DIR when set, else out_dir/wandb (WANDB_MODE=offline: local only)
    trackio       trackio's local store ($TRACKIO_DIR, default ~/.cache/huggingface/trackio);
                  `trackio show` opens it. Resumed runs continue the run of the same name.

TRL's forms are accepted: a name, a list, a comma-separated string, "all" (every installed
tracker) or "none" (no tracker: the JSONL files only). "jsonl" may be listed; it is always on.

A tracker that fails to start is a ConfigError naming report_to; one that fails while logging is
reported once (take_notices) and the run goes on: metrics.jsonl still holds everything.
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
import os
import secrets
import string
from pathlib import Path

from grpo_fast.errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "trackio")  # the ones report_to can add to the JSONL files
DEFAULT_REPORT_TO = ("tensorboard",)  # what runs logged before report_to existed
DEFAULT_PROJECT = "grpo-fast"
_INSTALL = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install 'grpo-fast[trackers]' (or pip install wandb)"),
    "trackio": ("trackio", "pip install 'grpo-fast[trackers]' (or pip install trackio)"),
}


# ---------------------------------------------------------------- report_to


def parse_report_to(report_to: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """report_to in any of TRL's forms -> the trackers it names, in TRACKERS order, without
    checking that they are installed ("all" stays "all"). None = DEFAULT_REPORT_TO."""
    if report_to is None:
        return list(DEFAULT_REPORT_TO)
    items = report_to.split(",") if isinstance(report_to, str) else report_to
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"report_to: expected a name or a list of names, got {report_to!r}")
    names = [p.strip().lower() for i in items for p in i.split(",") if p.strip()]
    if not names or names == ["none"]:
        return []
    for special in ("none", "all"):
        if special in names and len(names) > 1:
            raise ConfigError(f"report_to: {special!r} cannot be combined with other trackers, got {names}")
    if names == ["all"]:
        return ["all"]
    unknown = [n for n in names if n not in TRACKERS and n != "jsonl"]
    if unknown:
        choices = ", ".join(repr(t) for t in ("jsonl",) + TRACKERS)
        raise ConfigError(f"report_to: {unknown[0]!r} is not a tracker grpo-fast supports; choose from "
                          f"{choices}, 'all' or 'none'")
    return [t for t in TRACKERS if t in names]


def resolve_report_to(report_to: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """parse_report_to, then check each named tracker's package imports ("all" = those that do).
    Cheap enough for config validation: it imports the packages, it starts nothing."""
    names = parse_report_to(report_to)
    if names == ["all"]:
        return [t for t in TRACKERS if installed(t)]
    for name in names:
        problem = _import_problem(name)
        if problem:
            raise ConfigError(f"report_to: {name!r} {problem}")
    return names


def installed(name: str) -> bool:
    """Whether a tracker's package imports (a broken install counts as missing)."""
    return _import_problem(name) is None


def _import_problem(name: str) -> str | None:
    module, install = _INSTALL[name]
    try:
        importlib.import_module(module)
    except ImportError:
        return f"needs the {module} package, which is not installed: {install}"
    except Exception as exc:  # installed but broken (say, a protobuf it cannot use)
        return f"needs the {module} package, which fails to import ({_first_line(exc)}): {install}"
    return None


# ---------------------------------------------------------------- values


def _scalars(metrics: dict) -> dict[str, float]:
    """The finite numbers of a metrics dict, as floats (what trackers can plot)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, numbers.Real) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def _jsonable(v):
    """JSON has no NaN / Infinity: non-finite floats become null (strict parsers choke on NaN)."""
    if v is None or isinstance(v, (str, bool)):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v) if math.isfinite(float(v)) else None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


def _text(v) -> str:
    """A table cell for a prompt / completion: chat messages as 'role: content' lines."""
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(m, dict) and "content" in m for m in v):
        return "\n".join(f"{m.get('role', '?')}: {m['content']}" for m in v)
    return json.dumps(_jsonable(v), ensure_ascii=False)


def _table(step: int, rows: list[dict]) -> tuple[list[str], list[list]]:
    """Completion rows -> (columns, data): step, prompt, completion, reward, then any other keys
    in order of first appearance. Numbers stay numbers (non-finite -> None), the rest is text."""
    columns = ["step", "prompt", "completion", "reward"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    data = []
    for row in rows:
        cells = [step]
        for c in columns[1:]:
            v = row.get(c)
            cells.append(_jsonable(v) if v is None or isinstance(v, numbers.Real) else _text(v))
        data.append(cells)
    return columns, data


# ---------------------------------------------------------------- backends


class JsonlTracker:
    """metrics.jsonl: {"step": s, **metrics} per log call; completions.jsonl: {"step": s, **row}."""

    name = "jsonl"

    def __init__(self, out_dir: Path, *, append: bool):
        mode = "a" if append else "w"
        self._metrics = (out_dir / "metrics.jsonl").open(mode)
        self._completions = (out_dir / "completions.jsonl").open(mode)

    def log(self, step: int, metrics: dict) -> None:
        row = {k: _jsonable(float(v) if isinstance(v, numbers.Real) else v) for k, v in metrics.items()}
        self._metrics.write(json.dumps({"step": step, **row}, allow_nan=False) + "\n")
        self._metrics.flush()

    def log_completions(self, step: int, rows: list[dict]) -> None:
        for row in rows:
            self._completions.write(json.dumps({"step": step, **_jsonable(row)}, allow_nan=False) + "\n")
        self._completions.flush()

    def close(self, exit_code: int = 0) -> None:
        self._metrics.close()
        self._completions.close()


class TensorBoardTracker:
    """Scalars per metric name (slashes make TensorBoard sections) and the completions as text."""

    name = "tensorboard"

    def __init__(self, out_dir: Path, *, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge_step)

    def log(self, step: int, metrics: dict) -> None:
        for k, v in _scalars(metrics).items():
            self._writer.add_scalar(k, v, step)

    def log_completions(self, step: int, rows: list[dict]) -> None:
        if not rows:
            return
        blocks = []
        for r in rows:
            reward = r.get("reward")
            reward = f"{reward:.3f}" if isinstance(reward, numbers.Real) else str(reward)
            blocks.append(f"**prompt** {_text(r.get('prompt'))}\n\n**completion** {_text(r.get('completion'))}\n\n"
                          f"**reward** {reward}")
        self._writer.add_text("completions", "\n\n".join(blocks), step)

    def close(self, exit_code: int = 0) -> None:
        self._writer.close()


class _RunTracker:
    """W&B and trackio share the shape of a run: run.log(dict, step=...), and a Table class for
    the completions (self._table_cls)."""

    _run = None
    _table_cls = None

    def log(self, step: int, metrics: dict) -> None:
        values = _scalars(metrics)
        if values:
            self._run.log(values, step=step)

    def log_completions(self, step: int, rows: list[dict]) -> None:
        if rows:
            columns, data = _table(step, rows)
            self._run.log({"completions": self._table_cls(columns=columns, data=data)}, step=step)


class WandbTracker(_RunTracker):
    """A W&B run: scalars with wandb's step = our step, completions as a wandb.Table.

    The run id lives in out_dir/wandb/run_id: a fresh run draws a new one, --resume (append)
    reuses it with resume="allow", so the W&B run continues. W&B keeps steps increasing: steps
    that an interrupted run logged after its last checkpoint are not logged again on resume.
    A W&B run already open in this process (a notebook's wandb.init) is used and left open."""

    name = "wandb"

    def __init__(self, out_dir: Path, *, run_name: str | None, config: dict | None, project: str | None,
                 append: bool):
        import wandb

        self._wandb, self._table_cls = wandb, wandb.Table
        self._owned = wandb.run is None
        if not self._owned:
            self._run = wandb.run
            if config:
                self._run.config.update(config, allow_val_change=True)
            return
        try:
            self._run = wandb.init(
                project=project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                name=run_name, config=config, resume="allow", id=wandb_run_id(out_dir, append=append),
                dir=os.environ.get("WANDB_DIR") or str(out_dir))  # explicit: wandb caches env at its setup
        except Exception as exc:  # no API key, no network, bad settings: wandb's own message says which
            raise ConfigError(f"report_to: wandb could not start a run ({_first_line(exc)}); run `wandb login`, "
                              f"or set WANDB_MODE=offline to keep the run local") from None

    def close(self, exit_code: int = 0) -> None:
        if self._owned:
            self._run.finish(exit_code=exit_code)


class TrackioTracker(_RunTracker):
    """A trackio run in trackio's local store (TRACKIO_DIR). Resume goes by run name: --resume
    continues the newest run of that name in the project, a fresh run starts a new one."""

    name = "trackio"

    def __init__(self, out_dir: Path, *, run_name: str | None, config: dict | None, project: str | None,
                 append: bool):
        import trackio

        self._trackio, self._table_cls = trackio, trackio.Table
        try:
            self._run = trackio.init(project=project or os.environ.get("TRACKIO_PROJECT") or DEFAULT_PROJECT,
                                     name=run_name, config=config, resume="allow" if append else "never")
        except Exception as exc:
            raise ConfigError(f"report_to: trackio could not start a run ({_first_line(exc)})") from None

    def close(self, exit_code: int = 0) -> None:
        try:
            self._trackio.finish()  # finishes the current run (ours) and clears it
        except RuntimeError:  # no current run: someone else's trackio.init replaced ours
            self._run.finish()


def wandb_run_id(out_dir: Path, *, append: bool) -> str:
    """The W&B run id of this run folder: WANDB_RUN_ID if set; on resume the stored one; else new."""
    path = Path(out_dir) / "wandb" / "run_id"
    if os.environ.get("WANDB_RUN_ID"):
        run_id = os.environ["WANDB_RUN_ID"]
    elif append and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    else:
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# ---------------------------------------------------------------- the composite


class Trackers:
    """The JSONL files plus the trackers report_to names, behind one log / log_completions / close.

    append: continue the JSONL files (and the W&B / trackio run) of a resumed run; purge_step:
    TensorBoard drops the events of this step and later that an interrupted run wrote after its
    last checkpoint. config: the run's config, shown by W&B and trackio."""

    def __init__(self, out_dir: str | Path, report_to=None, *, run_name: str | None = None,
                 config: dict | None = None, append: bool = False, purge_step: int | None = None,
                 project: str | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        names = resolve_report_to(report_to)  # every package checked before any file is opened
        run_name = run_name or self.out_dir.resolve().name
        self.trackers: list = []
        self._notices: list[str] = []
        self._failed: set[str] = set()
        self._closed = False
        # Those that may fail to start (login, network) first, the files last: a tracker that
        # cannot start leaves the folder as it was.
        try:
            for name in sorted(names, key=lambda n: n == "tensorboard"):
                if name == "wandb":
                    self.trackers.append(WandbTracker(self.out_dir, run_name=run_name, config=config,
                                                      project=project, append=append))
                elif name == "trackio":
                    self.trackers.append(TrackioTracker(self.out_dir, run_name=run_name, config=config,
                                                        project=project, append=append))
                elif name == "tensorboard":
                    self.trackers.append(TensorBoardTracker(self.out_dir, purge_step=purge_step))
            self.trackers.insert(0, JsonlTracker(self.out_dir, append=append))
        except BaseException:
            self.close(exit_code=1)
            raise

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    def log(self, step: int, metrics: dict) -> None:
        self._each("log", step, metrics)

    def log_completions(self, step: int, rows: list[dict]) -> None:
        """rows: {"prompt", "completion", "reward", and any per-function reward / advantage keys}."""
        self._each("log_completions", step, rows)

    def take_notices(self) -> list[str]:
        """Lines for the user (a tracker that failed to log), each said once."""
        out, self._notices = self._notices, []
        return out

    def close(self, exit_code: int = 0) -> None:
        """Flush and close every tracker (all of them, even if one fails). exit_code != 0 marks
        the W&B run as failed. Closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        error = None
        for tracker in self.trackers:
            try:
                tracker.close(exit_code=exit_code)
            except Exception as exc:
                if tracker.name == "jsonl":
                    error = error or exc
                else:
                    self._notices.append(f"report_to: {tracker.name} failed to close ({_first_line(exc)})")
        if error is not None:
            raise error

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exit_code=0 if exc_type is None else 1)

    def _each(self, method: str, step: int, payload) -> None:
        for tracker in self.trackers:
            if tracker.name == "jsonl":  # the run's record: a failure here (disk full) is the run's failure
                getattr(tracker, method)(step, payload)
                continue
            try:
                getattr(tracker, method)(step, payload)
            except Exception as exc:
                if tracker.name not in self._failed:
                    self._failed.add(tracker.name)
                    self._notices.append(f"report_to: {tracker.name} failed to log step {step} "
                                         f"({_first_line(exc)}); metrics.jsonl has every step")


def make_trackers(report_to, out_dir: str | Path, *, run_name: str | None = None, config: dict | None = None,
                  append: bool = False, purge_step: int | None = None, project: str | None = None) -> Trackers:
    """Open the run's trackers: the JSONL files always, plus those report_to names (TRL's forms).
    An unknown name or a missing package is a ConfigError naming report_to and what to install."""
    return Trackers(out_dir, report_to, run_name=run_name, config=config, append=append, purge_step=purge_step,
                    project=project)
