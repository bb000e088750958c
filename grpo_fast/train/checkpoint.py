"""Checkpoints: atomic on disk, verified before use, exact on resume.

A checkpoint folder `checkpoint-<step>/` holds the adapter (peft save_pretrained), the optimizer
and scheduler states, every RNG state (python, numpy, torch CPU and CUDA), the prompt stream's
position, the trainer's own state (step, metric history, eval before), the run's config
(config.json, for the resume checks) and a manifest of every file's size and SHA-256. It is
written into a temp folder beside it, each file fsynced, then renamed into place, and only then
does the `latest` pointer (itself replaced atomically) name it: a kill -9 at any moment leaves
the previous checkpoint intact and the pointer naming a complete one.

Resume (`find_resumable`) trusts nothing: it takes the newest checkpoint whose files match its
manifest, falling back past incomplete or corrupt ones and saying which it skipped and why.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from grpo_fast.errors import ResumeError

LATEST = "latest"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^checkpoint-(\d+)(?:-r(\d+))?$")
_REQUIRED = ("state.pt", "trainer_state.json")
# the weights: a LoRA run's adapter, or (lora.enabled false) the whole model, in one file or sharded
_WEIGHTS = ("adapter/adapter_model.safetensors", "adapter/model.safetensors", "adapter/model.safetensors.index.json")


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest(folder: Path) -> dict:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}


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


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint folder's name says (checkpoint-17, checkpoint-17-r1), else None."""
    m = _NAME.match(path.name)
    return int(m.group(1)) if m else None


def remove_stray_temps(root: str | Path) -> list[Path]:
    """Delete temp folders / pointer files a killed save left behind; returns what was removed."""
    root = Path(root)
    if not root.is_dir():
        return []
    stray = [p for p in root.iterdir() if p.name.startswith((".tmp-checkpoint-", ".latest-"))]
    for p in stray:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return stray


def save_checkpoint(root: str | Path, step: int, *, model, optimizer, scheduler, stream, trainer_state: dict,
                    config: dict | None = None, keep: int = 2, rank_rngs: list[dict] | None = None,
                    model_state: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """Write checkpoint-<step> atomically and point `latest` at it; keep the newest `keep`.
    rank_rngs: every rank's RNG states in rank order (a data-parallel run; default: this
    process's). The stream's position is global (every rank draws the same prompts), so it is
    saved once. A sharded model (train/sharding.py) passes its gathered weights (model_state) and
    its optimizer state keyed by parameter name (optimizer_state), which any world size loads."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-checkpoint-{step}-", dir=root))
    try:
        model.save_pretrained(tmp / "adapter", **({} if model_state is None else {"state_dict": model_state}))
        torch.save({
            "optimizer": optimizer.state_dict() if optimizer_state is None else None,
            "optimizer_by_name": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "rng": rng_state() if rank_rngs is None else rank_rngs[0],
            "rank_rngs": [rng_state()] if rank_rngs is None else list(rank_rngs),
            "stream": stream.state_dict(),
        }, tmp / "state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}))
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=1))
        (tmp / MANIFEST).write_text(json.dumps(_manifest(tmp), indent=1))
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
    old = sorted(checkpoints(root), key=lambda p: (p.stat().st_mtime_ns, p.name))
    for path in old[:-keep] if keep > 0 else []:
        if path != final:
            shutil.rmtree(path, ignore_errors=True)
    return final


def checkpoints(root: str | Path) -> list[Path]:
    """Every checkpoint folder under root, complete or not."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]


def verify(path: Path) -> str | None:
    """None when the checkpoint's files are all there and match its manifest, else what is wrong."""
    if not any((path / rel).is_file() for rel in _WEIGHTS):
        return f"{_WEIGHTS[0]} is missing"
    for rel in _REQUIRED:
        if not (path / rel).is_file():
            return f"{rel} is missing"
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return None  # written before manifests existed: the loader is the check
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        return f"{MANIFEST} is unreadable ({exc})"
    for rel, want in manifest.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{rel} has {size} bytes, the manifest says {want['size']} (truncated or replaced)"
        if _sha256(f) != want["sha256"]:
            return f"{rel} does not match its checksum (corrupt)"
    return None


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint `latest` names, if it is there and complete (no checksum check)."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "trainer_state.json").is_file() else None


@dataclass
class Resumable:
    path: Path
    step: int
    skipped: list[str]  # "checkpoint-17: state.pt has 12 bytes, ..." for each newer one passed over


def find_resumable(root: str | Path) -> Resumable | None:
    """The newest checkpoint that verifies, falling back past broken ones (newest first: the one
    `latest` names, then by step). None when root has no checkpoint folder at all; ResumeError
    when it has some and none verifies (starting fresh over them is the user's call)."""
    root = Path(root)
    found = checkpoints(root)
    if not found:
        return None
    pointed = latest_checkpoint(root)
    order = sorted(found, key=lambda p: (p == pointed, checkpoint_step(p), p.stat().st_mtime_ns), reverse=True)
    skipped = []
    for path in order:
        problem = verify(path)
        if problem is None:
            return Resumable(path, checkpoint_step(path), skipped)
        skipped.append(f"{path.name}: {problem}")
    raise ResumeError(f"--resume: no usable checkpoint in {root} ({'; '.join(skipped)}); start afresh with "
                      f"--overwrite")


def read_config(path: Path) -> dict | None:
    """The run config a checkpoint was saved with (None for checkpoints older than that record)."""
    f = Path(path) / "config.json"
    return json.loads(f.read_text()) if f.is_file() else None


def load_full_weights(model, folder: Path) -> None:
    """A whole model's weights (save_pretrained of a full fine-tuning run: model.safetensors, or
    shards with their index) into `model`; only tied weights may be absent from the files."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(str(folder / name)))
    from grpo_fast.train import sharding

    if sharding.is_sharded(model):
        expected = set(model.state_dict())  # names only (a sharded model's values are its shards)
        missing, unexpected = [k for k in expected if k not in state], [k for k in state if k not in expected]
        sharding.load_full_state(model, {k: v for k, v in state.items() if k in expected})
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    untied = [k for k in missing if k not in tied]
    if unexpected or untied:
        raise ValueError(f"weights that do not fit this model: missing {untied[:3]}, unexpected {unexpected[:3]}")


def load_checkpoint(path: str | Path, *, model, optimizer, scheduler, stream, rank: int = 0, world_size: int = 1,
                    echo=None) -> dict:
    """Restore everything saved by save_checkpoint; returns the trainer state (with `step`).
    ResumeError naming the file when one cannot be loaded into this model / optimizer.

    Rank r restores rank r's RNG states. Under another world size than the checkpoint's, the
    prompt stream (global) and the weights continue exactly; ranks the saved run did not have
    keep their fresh per-rank seeds, so LoRA dropout masks (only they draw from these RNGs) differ
    from an uninterrupted run's; echo says so."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    weights = path / "adapter" / "adapter_model.safetensors"
    current = weights if weights.is_file() else path / "adapter"
    try:
        if weights.is_file():
            set_peft_model_state_dict(model, load_file(str(weights)))
        else:
            load_full_weights(model, path / "adapter")
        current = path / "state.pt"
        state = torch.load(current, weights_only=False)
        _load_optimizer(model, optimizer, state)
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["stream"])
        rngs = state.get("rank_rngs", [state["rng"]])
        if rank < len(rngs):
            set_rng_state(rngs[rank])
        if len(rngs) != world_size and echo is not None:
            echo(f"resuming a {len(rngs)}-rank checkpoint with {world_size} ranks: the prompt stream and the weights "
                 f"continue exactly (each step's groups are re-split across the ranks); per-rank RNG states "
                 f"(LoRA dropout) do not carry over one to one")
        current = path / "trainer_state.json"
        return json.loads(current.read_text())
    except ResumeError:
        raise
    except Exception as exc:  # safetensors, torch.load, shape mismatches: one line naming the file
        raise ResumeError(f"--resume: cannot load {current} ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc


def _load_optimizer(model, optimizer, state: dict) -> None:
    """The optimizer state as saved: by parameter index (one process, DDP, LoRA) or by parameter
    name (a sharded run); a sharded run resuming an unsharded full fine-tuning checkpoint names
    its indices (trainable parameters in model order, as build_optimizer took them)."""
    from grpo_fast.train import sharding

    by_name = state.get("optimizer_by_name")
    if by_name is None and sharding.is_sharded(model):
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        saved = state["optimizer"]
        by_name = {"state": {names[i]: v for i, v in saved["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
    if by_name is not None:
        sharding.load_full_optimizer_state(model, optimizer, by_name)
    else:
        optimizer.load_state_dict(state["optimizer"])
