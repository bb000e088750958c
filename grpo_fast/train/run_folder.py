"""The run folder (train.output_dir): never clobbered unasked.

A folder that holds a run (any of RUN_FILES) is continued with --resume or started afresh with
--overwrite, which removes those run files and nothing else; without either flag the run stops
before touching it. The folder must be a writable directory, checked before the model loads, so
a typo costs seconds, not a run. config.yaml is written only once the run's setup has been
validated (and again on resume, with the options the resumed run applies).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from grpo_fast.errors import RunFolderError

RUN_FILES = ("config.yaml", "metrics.jsonl", "completions.jsonl", "tensorboard", "wandb", "checkpoints", "adapter",
             "merged", "training.png")


def run_files(out_dir: Path) -> list[str]:
    """The run files present in out_dir."""
    return [name for name in RUN_FILES if (out_dir / name).exists()]


def prepare(out_dir: str | Path, *, resume: bool, overwrite: bool) -> Path:
    """Check out_dir can hold this run and make it so. Returns it as a Path."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RunFolderError(f"train.output_dir: {str(out_dir)!r} is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RunFolderError(f"train.output_dir: cannot write in {str(out_dir)!r} ({exc.strerror or exc})") from None
    present = run_files(out_dir)
    if present and not resume and not overwrite:
        raise RunFolderError(
            f"train.output_dir: {str(out_dir)!r} already holds a run ({', '.join(present)}); continue it with "
            f"--resume, or start afresh with --overwrite (removes those files), or pick another output_dir")
    if overwrite:
        for name in present:
            path = out_dir / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return out_dir


def write_config(out_dir: Path, text: str) -> None:
    """config.yaml, replaced atomically (a crash leaves the old one or the new one)."""
    fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".yaml", dir=out_dir)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, out_dir / "config.yaml")
