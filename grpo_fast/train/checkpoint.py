"""Checkpoints: atomic on disk, exact on resume.

A checkpoint folder `checkpoint-<step>/` holds the adapter (peft save_pretrained), the optimizer
and scheduler states, every RNG state (python, numpy, torch CPU and CUDA), the prompt stream's
position and the trainer's own state (step, metric history, eval before). It is written into a
temp folder beside it, each file fsynced, then renamed into place, and only then does the `latest`
pointer (itself replaced atomically) name it: a kill -9 at any moment leaves the previous
checkpoint intact and the pointer naming a complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

LATEST = "latest"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_pointer(root: Path, name: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".latest-", dir=root)
    with os.fdopen(fd, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)


def save_checkpoint(root: str | Path, step: int, *, model, optimizer, scheduler, stream, trainer_state: dict,
                    keep: int = 2) -> Path:
    """Write checkpoint-<step> atomically and point `latest` at it; keep the newest `keep`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-checkpoint-{step}-", dir=root))
    try:
        model.save_pretrained(tmp / "adapter")
        torch.save({
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "stream": stream.state_dict(),
        }, tmp / "state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}))
        _fsync_tree(tmp)
        # A re-save of a step (resuming a finished run) never touches the folder `latest` may
        # name: it gets a fresh name, and the old one goes with the cleanup below.
        k = 1
        while final.exists():
            final = root / f"checkpoint-{step}-r{k}"
            k += 1
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _write_pointer(root, final.name)
    old = sorted((p for p in root.glob("checkpoint-*") if p.is_dir()), key=lambda p: (p.stat().st_mtime_ns, p.name))
    for path in old[:-keep] if keep > 0 else []:
        if path != final:
            shutil.rmtree(path, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "trainer_state.json").is_file() else None


def load_checkpoint(path: str | Path, *, model, optimizer, scheduler, stream) -> dict:
    """Restore everything saved by save_checkpoint; returns the trainer state (with `step`)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    adapter = path / "adapter"
    weights = adapter / "adapter_model.safetensors"
    set_peft_model_state_dict(model, load_file(str(weights)))
    state = torch.load(path / "state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    stream.load_state_dict(state["stream"])
    set_rng_state(state["rng"])
    return json.loads((path / "trainer_state.json").read_text())
