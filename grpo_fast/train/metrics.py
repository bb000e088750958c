"""Run metrics: the loop's logger (the JSONL files and TensorBoard, through trackers.py), reading
metrics.jsonl back, and an end-of-run PNG plot of reward, eval accuracy and KL."""

from __future__ import annotations

import json
from pathlib import Path

from grpo_fast.train.trackers import Trackers, installed, make_trackers

__all__ = ["MetricsLogger", "Trackers", "make_trackers", "read_metrics", "plot_run"]


class MetricsLogger(Trackers):
    """metrics.jsonl + completions.jsonl, and TensorBoard when `tensorboard` and installed (as
    before report_to: a missing tensorboard package is skipped, not an error). append: continue the
    files of a resumed run; purge_step: TensorBoard drops the events of this step and later that an
    interrupted run wrote after its last checkpoint. New code: make_trackers(report_to, ...)."""

    def __init__(self, out_dir: str | Path, *, tensorboard: bool = True, append: bool = False,
                 purge_step: int | None = None):
        report_to = ["tensorboard"] if tensorboard and installed("tensorboard") else []
        super().__init__(out_dir, report_to, append=append, purge_step=purge_step)


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

    # eval/accuracy: runs logged before eval metrics were per reward function (eval/accuracy/mean)
    panels = [(("reward",), "reward (mean)"), (("eval/accuracy/mean", "eval/accuracy"), "eval accuracy"),
              (("kl",), "KL to reference")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (keys, title) in zip(axes, panels):
        pts = [(r["step"], r[k]) for r in rows for k in keys if isinstance(r.get(k), (int, float))]
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
