"""Metrics out of the loop: JSONL (one object per line), TensorBoard, and a loss plot."""

from __future__ import annotations

import json
import os
import time
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends `{"step": …, **metrics}` lines to `workdir/metrics.jsonl` and scalars to
    TensorBoard under `workdir/tensorboard` (only where `enabled`: process 0)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.workdir = workdir
        self.enabled = enabled
        self._tensorboard = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time(), **metrics}
        with open(os.path.join(self.workdir, METRICS_FILE), "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in metrics.items():
            if isinstance(value, int | float):
                self._tensorboard.add_scalar(name, value, step)
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(metrics_path: str, out_path: str) -> None:
    """Training loss (and held-out loss, where measured) against step, as a PNG."""
    if not os.path.exists(metrics_path):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    # A resumed run re-logs steps it replays; the last value of a step wins.
    train = {r["step"]: r["loss"] for r in records if "loss" in r}
    held_out = {r["step"]: r["eval/eval_loss"] for r in records if "eval/eval_loss" in r}
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = sorted(train)
    ax.plot(steps, [train[s] for s in steps], label="train loss")
    if held_out:
        steps = sorted(held_out)
        ax.plot(steps, [held_out[s] for s in steps], "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy on answer tokens")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
