"""``python -m train demo``: train a Fashion-MNIST teacher, distil an 8x smaller student with CE only, KD, TTM
and WTTM, print one comparison table and plot the students' test accuracy.

The runs and their hyper-parameters come from train/configs/demo.yaml.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import checkpoint, config  # noqa: E402
from .engine import train  # noqa: E402
from .errors import ConfigError, UserError  # noqa: E402

DEMO_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "demo.yaml")
LABELS = {"ce": "CE only", "kd": "KD", "ttm": "TTM", "wttm": "WTTM"}


def read_plan(path: str) -> dict:
    try:
        with open(path) as f:
            plan = config.load_yaml(f, f"demo config {path}")
    except OSError as exc:
        raise ConfigError(f"cannot read demo config {path}: {exc.strerror}") from exc
    if not isinstance(plan, dict):
        raise ConfigError(f"demo config {path} must hold a mapping with common, teacher and students")
    for section in ("common", "teacher", "students"):
        if not isinstance(plan.get(section), dict):
            raise ConfigError(f"demo config {path} needs a mapping {section!r}")
    return plan


def run_config(plan, overrides, out_dir, **run_keys) -> dict:
    cfg = config.defaults()
    cfg.update(plan["common"])
    cfg.update(run_keys)
    cfg["out_dir"] = out_dir
    for text in overrides:
        name, value = config.parse_override(text)
        cfg[name] = value
    return config.validate(cfg)


def plot_students(results: dict, teacher_top1: float, path: str):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (summary, history) in results.items():
        ax.plot([r["epoch"] for r in history], [r["test_top1"] for r in history], marker="o",
                label=f"{LABELS.get(name, name)} (best {summary['best_top1']:.2f})")
    ax.axhline(teacher_top1, color="k", ls="--", lw=1, label=f"teacher (last {teacher_top1:.2f})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Fashion-MNIST: cnn_teacher -> cnn_student")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(rows) -> str:
    header = ("run", "model", "loss", "best top-1", "last top-1", "s / epoch")
    lines = [header] + [tuple(map(str, r)) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def fmt(line):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(lines[0]), rule] + [fmt(line) for line in lines[1:]])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", default=DEMO_CONFIG, help="demo config (default train/configs/demo.yaml)")
    parser.add_argument("--out-dir", default=None, help="default runs/demo-<date>-<time>")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config keys applied to every run, e.g. data_dir=DIR or threads=2")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or time.strftime("runs/demo-%Y%m%d-%H%M%S")
    start = time.perf_counter()
    try:
        plan = read_plan(args.plan)
        teacher_cfg = run_config(plan, args.overrides, os.path.join(out_dir, "teacher"), **plan["teacher"])
        student_cfgs = {
            name: run_config(plan, args.overrides, os.path.join(out_dir, name), teacher=teacher_cfg["model"],
                             teacher_checkpoint=os.path.join(teacher_cfg["out_dir"], checkpoint.LAST),
                             eval_teacher=False, **keys)
            for name, keys in plan["students"].items()}
        print(f"== teacher: {teacher_cfg['model']}")
        teacher = train(teacher_cfg)
        results = {}
        for name, cfg in student_cfgs.items():
            print(f"\n== student: {cfg['model']} with {LABELS.get(name, name)}")
            summary = train(cfg)
            results[name] = (summary, checkpoint.load(os.path.join(cfg["out_dir"], checkpoint.LAST))["history"])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    total = time.perf_counter() - start

    rows = [("teacher", teacher_cfg["model"], "ce", f"{teacher['best_top1']:.2f}", f"{teacher['last_top1']:.2f}",
             f"{teacher['mean_train_time_s']:.1f}")]
    for name, (summary, _) in results.items():
        cfg = student_cfgs[name]
        rows.append((LABELS.get(name, name), cfg["model"], describe_loss(cfg), f"{summary['best_top1']:.2f}",
                     f"{summary['last_top1']:.2f}", f"{summary['mean_train_time_s']:.1f}"))
    plot_path = os.path.join(out_dir, "demo.png")
    plot_students(results, teacher["last_top1"], plot_path)
    table = format_table(rows)
    backends = sorted({summary["loss_backend"] for summary, _ in results.values() if summary["loss_backend"]})
    text = (f"\nFashion-MNIST, {teacher['train_images']:,} training images, {teacher['test_images']:,} test images, "
            f"seed {teacher_cfg['seed']}, ttm_kernels backend {'/'.join(backends)}; test top-1 in %, s / epoch = "
            f"training time of one epoch\n{table}\n"
            f"total wall time {total / 60:.1f} min; plot: {plot_path}; runs: {out_dir}/")
    print(text)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text.strip() + "\n")
    return 0


def describe_loss(cfg) -> str:
    if cfg["loss"] == "ce":
        return "ce"
    if cfg["loss"] == "kd":
        return f"kd T={cfg['temperature']:g} ce={cfg['ce_weight']:g} beta={cfg['beta']:g}"
    return f"{cfg['loss']} gamma={cfg['gamma']:g} beta={cfg['beta']:g}"
