"""Per-epoch records: the CSV, TensorBoard events (when tensorboard is installed) and a PNG of the curves."""
from __future__ import annotations

import csv
import functools
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CSV_NAME, PLOT_NAME, TB_DIR = "metrics.csv", "curves.png", "tensorboard"


def columns(task) -> tuple:
    """The CSV columns of a task's runs."""
    return (("epoch", "lr") + tuple(f"train_{m}" for m in task.train_metrics)
            + tuple(f"test_{m}" for m in task.eval_metrics) + ("train_time_s", "eval_time_s"))


class RunLog:
    """Owned by rank 0. The history (list of per-epoch rows) is also saved in the checkpoint, so a resumed run
    rewrites the CSV exactly up to the epoch it resumes from."""

    def __init__(self, out_dir: str, epochs_done: int, tensorboard: bool, title: str, columns: tuple,
                 metric_panel: tuple):
        self.out_dir, self.title, self.columns, self.metric_panel = out_dir, title, columns, metric_panel
        writer_class = summary_writer_class() if tensorboard else None
        self.writer = writer_class and writer_class(os.path.join(out_dir, TB_DIR), purge_step=epochs_done + 1)

    def write(self, history: list):
        """Record the newest row of ``history``: CSV (rewritten whole), TensorBoard, plot."""
        path = os.path.join(self.out_dir, CSV_NAME)
        with open(path + ".tmp", "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            for row in history:
                writer.writerow({k: "" if row.get(k) is None else row[k] for k in self.columns})
        os.replace(path + ".tmp", path)
        if self.writer is not None:
            row = history[-1]
            for name, value in row.items():
                if name != "epoch" and value is not None:
                    self.writer.add_scalar(name.replace("_", "/", 1), value, row["epoch"])
            self.writer.flush()
        plot_history(history, os.path.join(self.out_dir, PLOT_NAME), self.title, self.metric_panel)

    def close(self):
        if self.writer is not None:
            self.writer.close()


@functools.lru_cache(maxsize=None)
def summary_writer_class():
    """TensorBoard's SummaryWriter, or None (said once per process) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard is not installed: writing the CSV and the plot only")
        return None
    return SummaryWriter


def _series(history, name):
    return [math.nan if row.get(name) is None else row[name] for row in history]


def plot_history(history: list, path: str, title: str, metric_panel: tuple):
    """Loss, loss components, the task's ``metric_panel`` (title, ((column, legend), ...)) and the lr."""
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [
        (axes[0, 0], "loss", [("train_loss", "train total"), ("test_loss", "test CE")]),
        (axes[0, 1], "loss components (train)", [("train_ce", "CE"), ("train_kl", "KL"),
                                                  ("train_kl_weight", "mean KL weight")]),
        (axes[1, 0], *metric_panel),
        (axes[1, 1], "learning rate", [("lr", "lr")]),
    ]
    for ax, label, curves in panels:
        for name, legend in curves:
            values = _series(history, name)
            if not all(math.isnan(v) for v in values):
                ax.plot(epochs, values, marker="o" if len(epochs) < 30 else None, label=legend)
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        else:  # e.g. the KL components of a loss=ce run
            ax.text(0.5, 0.5, "not reported", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
