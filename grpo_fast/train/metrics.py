"""Run metrics: one JSON line per step (metrics.jsonl), TensorBoard scalars, sampled completions
(completions.jsonl + TensorBoard text), and an end-of-run PNG plot of reward, eval accuracy and KL."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLogger:
    """append: continue the files of a resumed run; purge_step: TensorBoard drops the events of
    this step and later that an interrupted run wrote after its last checkpoint."""

    def __init__(self, out_dir: str | Path, *, tensorboard: bool = True, append: bool = False,
                 purge_step: int | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        mode = "a" if append else "w"
        self._jsonl = (self.out_dir / "metrics.jsonl").open(mode)
        self._samples = (self.out_dir / "completions.jsonl").open(mode)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=purge_step)
            except Exception:  # tensorboard missing: JSONL still has everything
                self._tb = None

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        # JSON has no NaN / Infinity: a non-finite value is written as null (strict parsers choke on NaN).
        rows = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in clean.items()}
        self._jsonl.write(json.dumps({"step": step, **rows}, allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def log_completions(self, step: int, samples: list[dict]) -> None:
        for s in samples:
            self._samples.write(json.dumps({"step": step, **s}) + "\n")
        self._samples.flush()
        if self._tb is not None and samples:
            text = "\n\n".join(f"**prompt** {s['prompt']}\n\n**completion** {s['completion']}\n\n"
                               f"**reward** {s['reward']:.3f}" for s in samples)
            self._tb.add_text("completions", text, step)

    def close(self) -> None:
        self._jsonl.close()
        self._samples.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(out_dir: str | Path, filename: str = "training.png") -> Path | None:
    """Reward, eval accuracy and KL over steps from metrics.jsonl -> a PNG in the run folder."""
    rows = read_metrics(out_dir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reward", "reward (mean)"), ("eval/accuracy", "eval accuracy"), ("kl", "KL to reference")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, title) in zip(axes, panels):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out_dir) / filename
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
