"""Resuming a run: exactly, or refused by name.

The options that say what the checkpoint's weights and data order mean (IDENTITY) must not
change on resume; a change is refused with the option's name. Every other option is applied from
the new config: learning rate and schedule (the optimizer's and scheduler's saved hyperparameters
are replaced, the step count kept), a higher max_steps, logging, saving, evaluation. The logs
continue from the checkpoint's step: rows of steps after it (written by the interrupted run
after its last save) are dropped, so no step appears twice.

A checkpoint at max_steps (the run was killed after its last save, during the final eval, merge
or plots, or it had finished) resumes with no step left: the run's end is done again, as HF's
Trainer does for a checkpoint at max_steps. The final eval's row is then replaced, not repeated.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from grpo_fast.errors import ResumeError

# section.field, or section.* for a whole section
IDENTITY = ("model.name_or_path", "model.gguf_file", "model.dtype", "model.load_in_4bit", "lora.r",
            "lora.lora_alpha", "lora.target_modules", "lora.enabled", "data.*", "train.seed")
# Run-control flags: never "changed options" (they say how this invocation starts).
_CONTROL = ("train.resume", "train.overwrite")


def _flatten(config: dict) -> dict[str, object]:
    return {f"{section}.{k}": v for section, fields in config.items() for k, v in fields.items()}


def _is_identity(key: str) -> bool:
    return key in IDENTITY or f"{key.split('.')[0]}.*" in IDENTITY


def check_compatible(saved: dict | None, new: dict, step: int) -> list[str]:
    """Refuse what cannot be resumed (ResumeError); return the applied changes as
    'section.field: old -> new' lines. saved is None for checkpoints without a config record."""
    max_steps = new["train"]["max_steps"]
    if max_steps < step:
        raise ResumeError(f"train.max_steps is {max_steps}, but the checkpoint is at step {step}: a resumed run "
                          f"continues after it; raise train.max_steps (or set it to {step} to finish that run: "
                          f"the final eval, merge and plots), or start afresh with --overwrite")
    if saved is None:
        return []
    old, cur = _flatten(saved), _flatten(new)
    changed = [k for k in cur if k in old and old[k] != cur[k] and k not in _CONTROL]
    refused = [k for k in changed if _is_identity(k)]
    if refused:
        detail = "; ".join(f"{k} was {old[k]!r}, now {cur[k]!r}" for k in refused)
        raise ResumeError(f"--resume: {detail}. A resumed run must keep {', '.join(refused)} (the checkpoint's "
                          f"weights and data order depend on them); start a new run in another output_dir, or "
                          f"--overwrite")
    return [f"{k}: {old[k]!r} -> {cur[k]!r}" for k in changed]


def apply_optimizer_settings(optimizer, scheduler, train_cfg) -> None:
    """Put this run's learning rate, betas and weight decay into the restored optimizer, and the
    restored scheduler on this run's schedule (its step count kept). With unchanged options this
    recomputes exactly the values that were saved."""
    for group in optimizer.param_groups:
        group["initial_lr"] = train_cfg.learning_rate
        group["betas"] = (train_cfg.adam_beta1, train_cfg.adam_beta2)
        group["weight_decay"] = train_cfg.weight_decay
    scheduler.base_lrs = [train_cfg.learning_rate] * len(optimizer.param_groups)
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _is_final_eval(row: dict) -> bool:
    """The row the run's end logs: eval metrics alone (a step's own eval rides in its step row)."""
    keys = [k for k in row if k != "step"]
    return bool(keys) and all(k.startswith("eval/") for k in keys)


def truncate_logs(out_dir: Path, step: int, finishing: bool = False) -> int:
    """Drop rows of steps after `step` from metrics.jsonl and completions.jsonl (atomically);
    finishing (a resume with no step left, whose end logs the final eval again) also drops the
    final eval's row at `step`. Returns how many rows went."""
    dropped = 0
    for name in ("metrics.jsonl", "completions.jsonl"):
        path = out_dir / name
        if not path.is_file():
            continue
        keep = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                row_step = row.get("step", 0)
            except ValueError:
                continue  # a line torn by a kill -9: never a finished step's record
            again = finishing and name == "metrics.jsonl" and row_step == step and _is_final_eval(row)
            if row_step <= step and not again:
                keep.append(line)
            else:
                dropped += 1
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=out_dir)
        with os.fdopen(fd, "w") as f:
            f.write("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
    return dropped
