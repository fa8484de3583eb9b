"""The distillation demos: one teacher, then a much smaller student trained with CE only, KD, TTM and WTTM, each
over several seeds; one table (mean +- std over the seeds) and one plot with error bars, both made from the
``results.json`` at the top of the output folder.

    python -m train demo                 # Fashion-MNIST images (train/configs/demo.yaml)
    python -m train demo-lm              # a causal LM on the Python standard library (train/configs/demo_lm.yaml)
    python -m train demo --select        # choose the students' hyper-parameters on the validation split
    python -m train demo-lm --select --students wttm_vocab   # only that student's grid
    python -m train demo --report DIR    # remake the table and the plot from DIR/results.json

The teacher is trained once and cached (cache.py), keyed by a hash of its config and of its data; a rerun
reuses it when both match (and says so), and measures it again on load. A student with ``teacher_topk_k: K`` in
the plan distils from the teacher's top-K store instead (``python -m train teacher-topk``'s writer, run once
and cached beside the teacher). The students report the metric of their last epoch (no epoch is picked on the
test set); ``--select`` runs the plan's grid on a validation split carved from the training data and prints the
best values, which the plan then records.

Ctrl-C (or SIGTERM) stops a demo with one line saying what a rerun of the same command resumes from: the cached
teacher's last checkpoint (written inside its epochs too), its top-k store's complete shards, and, in the output
folder of an interrupted demo given again as --out-dir, the finished student runs (the others go on from their
last checkpoints); the student runs of a demo in a new folder start over.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import multiprocessing
import os
import platform
import shlex
import signal
import statistics
import sys
import threading
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from . import cache, checkpoint, config, data, text_data  # noqa: E402
from .engine import SUMMARY_NAME, Distributed, autocast_factory, run_epoch, train  # noqa: E402
from .errors import ConfigError, Interrupted, UserError  # noqa: E402
from .eta import duration  # noqa: E402
from .tasks import get_task  # noqa: E402
from .teacher_topk import write_store, writer_interrupted  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(__file__), "configs")
PLANS = {"demo": os.path.join(CONFIGS, "demo.yaml"), "demo-lm": os.path.join(CONFIGS, "demo_lm.yaml")}
LABELS = {"ce": "CE only", "kd": "KD", "ttm": "TTM", "wttm": "WTTM", "wttm_vocab": "WTTM vocab-norm"}
RESULTS, TABLE, PLOT = "results.json", "results.md", "results.png"
# In the output folder of a demo stopped by Ctrl-C while its students ran: a rerun may go on in that folder.
INTERRUPTED = "interrupted.txt"
# A demo plan's student key (not a config key): distil from the cached teacher's top-k store with this k.
TOPK_KEY = "teacher_topk_k"
# Config keys that change neither the teacher's weights nor its data: left out of its cache key.
NOT_IN_TEACHER_KEY = tuple(k for k in config.RESUMABLE_CHANGES if k != "epochs") + ("eval_split", "test_subset")


@dataclasses.dataclass(frozen=True)
class Metric:
    """The number a demo reports per run: the task's checkpoint metric at the last epoch."""
    task_metric: str  # the task's name (top1, ppl)
    prefix: str  # test / heldout, or val
    label: str
    higher_is_better: bool

    @property
    def name(self):
        return f"{self.prefix}_{self.task_metric}"


def metric_of(cfg) -> Metric:
    task = get_task(cfg["task"])
    validation = cfg["eval_split"] == "val"
    if cfg["task"] == "lm":
        return Metric(task.best_metric, "val" if validation else "heldout",
                      f"{'validation' if validation else 'held-out'} perplexity", task.higher_is_better)
    return Metric(task.best_metric, "val" if validation else "test",
                  f"{'validation' if validation else 'test'} top-1 (%)", task.higher_is_better)


# ---------------------------------------------------------------------------------------------------- the plan

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
    _check_seeds(plan.get("seeds"), f"demo config {path} needs 'seeds'")
    for name, keys in plan["students"].items():
        top_k = keys.get(TOPK_KEY, 1) if isinstance(keys, dict) else 1
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise ConfigError(f"demo config {path}: student {name!r}: {TOPK_KEY} must be an integer >= 1 (the k of "
                              f"the teacher's top-k store), got {top_k!r}")
    select = plan.get("select")
    if select is not None:
        if not isinstance(select, dict) or not isinstance(select.get("grid"), dict):
            raise ConfigError(f"demo config {path}: 'select' needs 'seeds' and a mapping 'grid'")
        _check_seeds(select.get("seeds"), f"demo config {path}: 'select' needs 'seeds'")
        for name, axes in select["grid"].items():
            if name not in plan["students"] or not isinstance(axes, dict) or not all(
                    isinstance(v, list) and v for v in axes.values()):
                raise ConfigError(f"demo config {path}: select grid {name!r} must name a student and map config "
                                  f"keys to lists of values, got {axes!r}")
    return plan


def only_students(plan: dict, names: str) -> dict:
    """The plan with only the students ``names`` (comma-separated keys of its 'students'), in that order."""
    chosen = names.split(",")
    unknown = [name for name in chosen if name not in plan["students"]]
    if unknown:
        raise ConfigError(f"--students: {', '.join(map(repr, unknown))} not in the plan's students "
                          f"({', '.join(plan['students'])})")
    return {**plan, "students": {name: plan["students"][name] for name in chosen}}


def _check_seeds(seeds, message):
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ConfigError(f"{message}, a list of integers, got {seeds!r}")


def run_config(plan, overrides, out_dir, **run_keys) -> dict:
    cfg = config.defaults()
    cfg.update(plan["common"])
    cfg.update(run_keys)
    cfg["out_dir"] = out_dir
    for text in overrides:
        name, value = config.parse_override(text)
        cfg[name] = value
    return config.validate(cfg)


def hyperparameters(cfg, top_k: int = 0) -> dict:
    if cfg["loss"] == "ce":
        return {}
    scale = {"temperature": cfg["temperature"]} if cfg["loss"] == "kd" else {"gamma": cfg["gamma"]}
    sparse = {"teacher_top_k": top_k, "topk_tail": cfg["topk_tail"]} if top_k else {}
    norm = {"weight_norm": cfg["weight_norm"]} if cfg["weight_norm"] != "none" else {}
    return {**scale, "beta": cfg["beta"], "ce_weight": cfg["ce_weight"], **norm, **sparse}


def shown(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def describe(hyper: dict) -> str:
    short = {"temperature": "T", "ce_weight": "ce", "teacher_top_k": "top-k", "topk_tail": "tail"}
    return ", ".join(f"{short.get(k, k)}={shown(v)}" for k, v in hyper.items()) or "-"


@dataclasses.dataclass
class Job:
    name: str  # the row of the table
    seed: int
    cfg: dict
    top_k: int = 0  # > 0: distils from the cached teacher's top-k store (cfg["teacher_topk"])


def student_jobs(plan, overrides, out_dir, teacher_cfg, *, select: bool) -> list:
    """One job per (student, seed); with ``select``, per (grid point, seed) on the validation split."""
    teacher_keys = {"teacher": teacher_cfg["model"], "eval_teacher": False, "progress": False,
                    "teacher_checkpoint": os.path.join(teacher_cfg["out_dir"], checkpoint.LAST)}
    seeds = plan["select"]["seeds"] if select else plan["seeds"]
    jobs = []
    for name, keys in plan["students"].items():
        keys = dict(keys)
        top_k = keys.pop(TOPK_KEY, 0)
        grid = plan["select"]["grid"].get(name, {}) if select else {}
        for values in itertools.product(*grid.values()):
            point = dict(zip(grid, values))
            label = (LABELS.get(name) or f"{LABELS.get(keys.get('loss'), name)} top-{top_k}") + "".join(
                f" {k}={shown(v)}" for k, v in point.items())
            for seed in seeds:
                folder = os.path.join(out_dir, label.replace(" ", "_").replace("=", "") + f"-seed{seed}")
                extra = {"eval_split": "val"} if select else {}
                run_keys = {**keys, **point, **teacher_keys, **extra, "seed": seed}
                cfg = run_config(plan, overrides, folder, **run_keys)
                if top_k:  # the store's folder depends on the run's windows
                    cfg = run_config(plan, overrides, folder, **run_keys,
                                     teacher_topk=topk_store_dir(teacher_cfg, cfg, top_k))
                jobs.append(Job(label, seed, cfg, top_k))
    return jobs


# ---------------------------------------------------------------------------------------------------- the teacher

def data_fingerprint(cfg) -> str:
    """A hash of what the teacher learns from: the dataset files' contents (and for BPE, the vocabulary)."""
    if cfg["task"] == "lm":
        corpus = text_data.read_corpus(cfg)
        if cfg["tokenizer"] == "bpe":
            return cache.hash_json([corpus.fingerprint, text_data.bpe_tokenizer(corpus, cfg["vocab_size"]).fingerprint])
        return corpus.fingerprint
    files = data.source_files(cfg)
    return cache.hash_files(files, os.path.dirname(files[0]))


def cached_teacher_config(plan, overrides, name) -> dict:
    """The teacher's config, its out_dir the cache folder named by the hash of that config and of its data. Keys
    at their default are left out of the hash: a config key that a later version adds (with a default that keeps
    the old behaviour) does not throw away a teacher that took an hour to train."""
    cfg = run_config(plan, overrides, None, **plan["teacher"])
    default = config.defaults()
    chosen = {k: v for k, v in cfg.items() if k not in NOT_IN_TEACHER_KEY + ("out_dir",) and v != default[k]}
    key = cache.hash_json({"config": chosen, "data": data_fingerprint(cfg)})
    cfg["out_dir"] = os.path.join(cache.cache_dir("teachers"), f"{name}-{cfg['model']}-{key[:16]}")
    return cfg


def ensure_teacher(cfg) -> str:
    """Reuse the cached teacher run, finish an interrupted one (from its last checkpoint, inside an epoch too), or
    train it. Says which."""
    folder = cfg["out_dir"]
    if os.path.exists(os.path.join(folder, SUMMARY_NAME)):
        print(f"== teacher {cfg['model']}: reusing the cached run {folder} (its config and data fingerprint match)")
        return "cached"
    resume = os.path.exists(os.path.join(folder, checkpoint.LAST))
    print(f"== teacher {cfg['model']}: {'resuming the interrupted' if resume else 'training once, cached in'} {folder}")
    try:
        train(cfg, resume=resume, label="teacher")
    except Interrupted as exc:
        where = (f"the teacher at {exc.resume_from}" if exc.resume_from
                 else f"the start of the teacher's training (no checkpoint was written yet in {folder})")
        advice = f"rerun the same command to resume from {where}; the student runs have not started"
        raise Interrupted(advice) from None
    return "trained"


def topk_store_dir(teacher_cfg, student_cfg, k: int) -> str:
    """Where the cached teacher's top-k store of the student's training windows lives: beside the teacher, named
    by k and by what cuts the windows (the teacher's key already covers the text and its split)."""
    windows = {key: student_cfg[key] for key in ("train_subset", "seq_len", "prompt_tokens", "tokenizer")}
    return os.path.join(teacher_cfg["out_dir"], f"topk{k}-{cache.hash_json(windows)[:16]}")


def ensure_topk_store(job: Job, teacher_cfg):
    """Write the teacher's top-k store for ``job`` once (``python -m train teacher-topk``'s writer, resumable);
    a complete one is reused, and checked against the run's windows when the run opens it."""
    folder = job.cfg["teacher_topk"]
    with cache.locked(folder):
        store_cfg = {**job.cfg, "out_dir": folder, "teacher": teacher_cfg["model"], "teacher_topk": None,
                     "teacher_checkpoint": os.path.join(teacher_cfg["out_dir"], checkpoint.LAST), "threads": 0}
        print(f"== teacher top-{job.top_k} store: {folder}")
        try:
            write_store(store_cfg, {"k": job.top_k, "logprobs_dtype": "float32", "windows_per_shard": 1024},
                        log=lambda line: print(f"   {line}"))
        except KeyboardInterrupt:
            raise writer_interrupted(folder, f"the teacher's top-{job.top_k} store") from None


def measure(cfg, weights: str) -> tuple:
    """(metric, CE per sample, parameter count, data) of the model ``cfg['model']`` with ``weights`` on ``cfg``'s
    evaluation split: a cached teacher is measured again, not trusted."""
    dist_ctx = Distributed(cfg["device"])
    task = get_task(cfg["task"])(cfg, dist_ctx.device)
    task.build_data(0, 1)
    model = task.build_student()
    checkpoint.load_weights(model, weights, f"{cfg['model']} ({cfg['task']})")
    autocast, _ = autocast_factory(cfg, dist_ctx.device)
    means, _, _ = run_epoch(task, model, None, task.data.test, dist_ctx, autocast, desc="teacher eval",
                            progress=cfg["progress"])
    return means[task.best_metric], means["loss"], count_parameters(model), task.data


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights (the GPTs' LM head) once


def parameters_of(cfg, dataset) -> int:
    """The parameter count of ``cfg['model']`` for ``dataset`` (its class count or vocabulary)."""
    task = get_task(cfg["task"])(cfg, torch.device("cpu"))
    task.data = dataset
    return count_parameters(task.build_student())


# ---------------------------------------------------------------------------------------------------- the students

def train_logged(cfg: dict, log_path: str, on_estimate=None):
    """One student run, its output to ``log_path``: (summary, per-epoch history), or None if it diverged. In the
    folder of an interrupted demo, a run it finished is read back and one it started goes on from its checkpoint."""
    last = os.path.join(cfg["out_dir"], checkpoint.LAST)
    if os.path.exists(os.path.join(cfg["out_dir"], SUMMARY_NAME)):
        with open(os.path.join(cfg["out_dir"], SUMMARY_NAME)) as f:
            return json.load(f), checkpoint.load(last)["history"]
    resume = os.path.exists(last)
    os.makedirs(cfg["out_dir"], exist_ok=True)
    with open(log_path, "a" if resume else "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        try:
            summary = train(cfg, resume=resume, on_estimate=on_estimate)
        except FloatingPointError as exc:  # a hyper-parameter the grid tries may diverge; that is a result too
            print(f"diverged: {exc}")
            return None
    return summary, checkpoint.load(last)["history"]


class StudentsEstimate:
    """The student runs' time estimates: once the first runs (as many as run at a time) have timed their first
    steps, the whole lot on this machine, and with what ran before them (``began``: the demo's start), the demo;
    after each run, the time left at the mean time of the runs so far (the students are the demo's last part)."""

    def __init__(self, runs: int, at_a_time: int, began: float, write):
        self.runs, self.at_a_time, self.began, self.write = runs, at_a_time, began, write
        self.start = time.perf_counter()
        self.estimates, self.durations = [], []

    def estimated(self, seconds: float):
        """A run's estimate of its own time (engine.train's on_estimate)."""
        self.estimates.append(seconds)
        if len(self.estimates) == min(self.at_a_time, self.runs):
            total = statistics.fmean(self.estimates) * math.ceil(self.runs / self.at_a_time)
            self.write(f"students: about {duration(total)} on this machine (measured over the first steps of "
                       f"{len(self.estimates)} run{'s' if len(self.estimates) > 1 else ''}); the demo: about "
                       f"{duration(self.start - self.began + total)} in all")

    def finished(self, seconds: float) -> str:
        """'; about 3 min left' after a run that took ``seconds``, '' after the last."""
        self.durations.append(seconds)
        left = self.runs - len(self.durations)
        return f"; about {duration(statistics.fmean(self.durations) * left / self.at_a_time)} left" if left else ""


_estimates = None  # in a worker process: the pipe its runs send their time estimates to


def _start_worker(estimates):
    global _estimates
    _estimates = estimates
    # tqdm's default lock is a multiprocessing one, a named semaphore: a worker that Ctrl-C makes the parent stop
    # (SIGTERM) would leave it behind, and Python's resource tracker would warn about it on stderr.
    tqdm.set_lock(threading.RLock())


def _run_job(cfg: dict, log_path: str):
    """A worker's student run: (its outcome, its wall time)."""
    start = time.perf_counter()
    outcome = train_logged(cfg, log_path, on_estimate=_estimates.send)
    return outcome, time.perf_counter() - start


def run_jobs(jobs: list, n_jobs: int, metric: Metric, began: float, stopped) -> list:
    """Train every job, ``n_jobs`` at a time in separate processes (one thread each: small models use two cores
    better as two runs than as one run on two threads). Returns (summary, history) or None per job. On Ctrl-C the
    workers are stopped and ``stopped(number of finished runs)`` is raised (an Interrupted). ``began``: when the
    demo started, for its time estimate."""
    outcomes = [None] * len(jobs)
    stdout = sys.stdout  # a run's own output goes to its log
    bar = tqdm(total=len(jobs), desc="students", unit="run", dynamic_ncols=True)
    eta = StudentsEstimate(len(jobs), n_jobs, began, lambda line: bar.write(line, file=stdout))

    def report(i, outcome, seconds):
        outcomes[i] = outcome
        job = jobs[i]
        value = "diverged" if outcome is None else f"{outcome[0][f'last_{metric.task_metric}']:.2f}"
        bar.write(f"{job.name} seed {job.seed}: {metric.label} {value} ({job.cfg['out_dir']}){eta.finished(seconds)}",
                  file=stdout)
        bar.update()

    logs = [os.path.join(job.cfg["out_dir"], "log.txt") for job in jobs]
    try:
        if n_jobs == 1:
            for i, job in enumerate(jobs):
                start = time.perf_counter()
                outcome = train_logged(job.cfg, logs[i], on_estimate=eta.estimated)
                report(i, outcome, time.perf_counter() - start)
        else:
            run_in_workers(jobs, logs, n_jobs, eta, report)
    except KeyboardInterrupt:
        raise stopped(bar.n) from None
    finally:
        bar.close()
    return outcomes


def run_in_workers(jobs, logs, n_jobs, eta, report):
    """``run_jobs`` in ``n_jobs`` worker processes, which Ctrl-C does not reach: on it, or SIGTERM, this process
    stops them (and they die without a word)."""
    context = multiprocessing.get_context("spawn")  # no fork of a process whose OpenMP threads already ran
    # One pipe for all the workers: a message (a float) is one write, far below PIPE_BUF, which the OS writes whole
    # however many processes write. (A queue would add semaphores, which workers stopped mid-run would leave for
    # Python's resource tracker to warn about.)
    estimates, estimates_in = context.Pipe(duplex=False)
    others = set(multiprocessing.active_children())
    with concurrent.futures.ProcessPoolExecutor(n_jobs, mp_context=context, initializer=_start_worker,
                                                initargs=(estimates_in,)) as pool:
        try:
            # The workers are started by the first submits; started with SIGINT ignored, they keep ignoring it.
            ctrl_c = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                futures = {pool.submit(_run_job, job.cfg, logs[i]): i for i, job in enumerate(jobs)}
            finally:
                signal.signal(signal.SIGINT, ctrl_c)
            pending = set(futures)
            while pending:
                done, pending = concurrent.futures.wait(pending, timeout=1,
                                                        return_when=concurrent.futures.FIRST_COMPLETED)
                while estimates.poll():
                    eta.estimated(estimates.recv())
                for future in done:
                    report(futures[future], *future.result())
        except BaseException:
            for worker in set(multiprocessing.active_children()) - others:
                worker.terminate()
            pool.shutdown(cancel_futures=True)
            raise


# ---------------------------------------------------------------------------------------------------- results

def summarize(jobs, outcomes, metric: Metric, params: dict) -> list:
    """The runs of results.json: per table row, the seeds' last-epoch values, their mean and sample std."""
    runs = {}
    for job, outcome in zip(jobs, outcomes):
        run = runs.setdefault(job.name, {
            "name": job.name, "loss": job.cfg["loss"], "model": job.cfg["model"], "params": params[job.cfg["model"]],
            "hyperparameters": hyperparameters(job.cfg, job.top_k), "seeds": [], "values": [], "heldout_ce": [],
            "train_time_s": [], "out_dirs": []})
        run["seeds"].append(job.seed)
        run["out_dirs"].append(job.cfg["out_dir"])
        if outcome is None:  # diverged: no number, and said so in the table
            run["values"].append(None)
            run["heldout_ce"].append(None)
            continue
        summary, history = outcome
        run["values"].append(summary[f"last_{metric.task_metric}"])
        run["heldout_ce"].append(history[-1]["test_loss"])
        run["train_time_s"].append(round(sum(r["train_time_s"] for r in history), 1))
    for run in runs.values():
        finite = [v for v in run["values"] if v is not None and math.isfinite(v)]
        run["mean"] = statistics.fmean(finite) if finite else None
        run["std"] = statistics.stdev(finite) if len(finite) > 1 else None
    return list(runs.values())


def format_table(header, rows) -> str:
    lines = [tuple(header)] + [tuple(map(str, r)) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def fmt(line):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(lines[0]), rule] + [fmt(line) for line in lines[1:]])


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _mean_std(run) -> str:
    if run["mean"] is None:
        return "diverged"
    return f"{run['mean']:.2f} +- {run['std']:.2f}" if run["std"] is not None else f"{run['mean']:.2f}"


def render_table(results: dict) -> str:
    metric = results["metric"]
    teacher = results["teacher"]
    baseline = next((r for r in results["runs"] if r["loss"] == "ce" and r["mean"] is not None), None)
    rows = [("teacher", f"{teacher['model']} ({_params(teacher['params'])})", "ce", "-", f"{teacher[metric]:.2f}", "-",
             "one run, cached" if teacher["cached"] else "one run, trained now")]
    for run in results["runs"]:
        delta = ("-" if baseline is None or run is baseline or run["mean"] is None
                 else f"{run['mean'] - baseline['mean']:+.2f}")
        values = ", ".join("diverged" if v is None else f"{v:.2f}" for v in run["values"])
        rows.append((run["name"], f"{run['model']} ({_params(run['params'])})", run["loss"],
                     describe(run["hyperparameters"]), _mean_std(run), delta, values))
    header = ("run", "model", "loss", "hyper-parameters", f"{results['metric_label']}, mean +- std",
              "vs CE only", "per seed")
    return format_table(header, rows)


def render_text(results: dict) -> str:
    better = "higher" if results["higher_is_better"] else "lower"
    return (f"{results['title']}\n{results['data']}\n"
            f"{results['metric_label']} of the last epoch ({better} is better); mean +- sample std over seeds "
            f"{', '.join(map(str, results['seeds']))}\n\n{render_table(results)}\n\n"
            f"{results['date']}, {results['machine']}; wall time {results['wall_time_s'] / 60:.1f} min "
            f"({results['jobs']} run{'s' if results['jobs'] > 1 else ''} at a time); command: {results['command']}\n")


def plot(results: dict, path: str):
    """Each run's seeds (dots) and mean +- std (error bar); the CE-only mean and the teacher as lines."""
    runs = [r for r in results["runs"] if r["mean"] is not None]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(runs) + 2), 4.5))
    for x, run in enumerate(runs):
        values = [v for v in run["values"] if v is not None]
        ax.errorbar(x, run["mean"], yerr=run["std"] or 0, fmt="o", color="C0", capsize=6, ms=8, zorder=3)
        ax.scatter([x + 0.12] * len(values), values, color="C1", s=14, zorder=2,
                   label="one seed" if x == 0 else None)
    teacher = results["teacher"][results["metric"]]
    ax.axhline(teacher, color="k", ls="--", lw=1, label=f"teacher {teacher:.2f}")
    baseline = next((r for r in runs if r["loss"] == "ce"), None)
    if baseline is not None:
        ax.axhline(baseline["mean"], color="gray", ls=":", lw=1, label=f"CE only {baseline['mean']:.2f}")
    ax.set_xticks(range(len(runs)), [r["name"].replace(" ", "\n", 1) for r in runs])
    ax.set_xlim(-0.5, len(runs) - 0.5)
    ax.set_ylabel(results["metric_label"])
    ax.set_title(f"{results['title']}\nmean +- std over {len(results['seeds'])} seeds", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, out_dir: str) -> str:
    """results.json, and the table (results.md) and plot (results.png) made from it."""
    with open(os.path.join(out_dir, RESULTS), "w") as f:
        json.dump(results, f, indent=2)
    return report(out_dir)


def report(out_dir: str) -> str:
    path = os.path.join(out_dir, RESULTS)
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    text = render_text(results)
    with open(os.path.join(out_dir, TABLE), "w") as f:
        f.write(text)
    plot(results, os.path.join(out_dir, PLOT))
    return text


def best_points(results: dict) -> str:
    """Per loss (and WTTM weight normalisation), the grid point with the best mean validation metric, as the plan's
    YAML."""
    lines = []
    sign = 1 if results["higher_is_better"] else -1

    def kind(run):
        return run["loss"], run["hyperparameters"].get("weight_norm", "none")

    for loss, norm in dict.fromkeys(map(kind, results["runs"])):
        candidates = [r for r in results["runs"] if kind(r) == (loss, norm) and r["mean"] is not None]
        if candidates and loss != "ce":
            best = max(candidates, key=lambda r: sign * r["mean"])
            keys = ", ".join(f"{k}: {shown(v)}" for k, v in best["hyperparameters"].items())
            lines.append(f"  {loss}: {{{keys}}}   # {results['metric']} {_mean_std(best)}")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, load average {load:.1f} at the end; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


# ---------------------------------------------------------------------------------------------------- main

def main(argv=None, demo: str = "demo") -> int:
    parser = argparse.ArgumentParser(prog=f"python -m train {demo}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", default=PLANS[demo], help=f"demo config (default {os.path.relpath(PLANS[demo])})")
    parser.add_argument("--out-dir", default=None, help=f"default runs/{demo}-<date>-<time>")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count(), help="student runs at a time, one thread each (default: the CPU count)")
    parser.add_argument("--select", action="store_true",
                        help="run the plan's hyper-parameter grid on the validation split and print the best values")
    parser.add_argument("--students", metavar="NAME[,NAME...]",
                        help="run only these students of the plan (its 'students' keys), e.g. to --select one grid")
    parser.add_argument("--report", metavar="DIR", help="remake the table and the plot from DIR/results.json")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config keys applied to every run, e.g. data_dir=DIR or epochs=1")
    args = parser.parse_args(argv)
    try:
        if args.report:
            print(report(args.report))
            return 0
        if args.jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
        return run_demo(args, demo, list(sys.argv[2:] if argv is None else argv))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def run_demo(args, demo: str, argv: list) -> int:
    start = time.perf_counter()
    out_dir = args.out_dir or time.strftime(f"runs/{demo}{'-select' if args.select else ''}-%Y%m%d-%H%M%S")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, INTERRUPTED)):
        raise ConfigError(f"--out-dir {out_dir} is not empty: choose a new folder (a demo never overwrites runs)")
    plan = read_plan(args.plan)
    if args.students is not None:
        plan = only_students(plan, args.students)
    if args.select and not isinstance(plan.get("select"), dict):
        raise ConfigError(f"--select needs a 'select' section (seeds and grid) in {args.plan}")
    teacher_cfg = cached_teacher_config(plan, args.overrides, demo)
    jobs = student_jobs(plan, args.overrides, out_dir, teacher_cfg, select=args.select)
    metric = metric_of(jobs[0].cfg)
    status = ensure_teacher(teacher_cfg)
    for job in {job.cfg["teacher_topk"]: job for job in jobs if job.top_k}.values():
        ensure_topk_store(job, teacher_cfg)
    eval_cfg = {**teacher_cfg, "eval_split": jobs[0].cfg["eval_split"], "test_subset": jobs[0].cfg["test_subset"]}
    try:
        teacher_value, teacher_ce, teacher_params, dataset = measure(eval_cfg, os.path.join(teacher_cfg["out_dir"],
                                                                                            checkpoint.LAST))
    except KeyboardInterrupt:
        raise Interrupted(f"rerun the same command to resume from the cached teacher ({teacher_cfg['out_dir']}); the "
                          "student runs have not started") from None
    with open(os.path.join(teacher_cfg["out_dir"], SUMMARY_NAME)) as f:
        teacher_summary = json.load(f)
    note = "" if args.select else f" (when trained: {teacher_summary[f'last_{metric.task_metric}']:.2f})"
    print(f"teacher {teacher_cfg['model']} ({_params(teacher_params)} parameters): {metric.label} {teacher_value:.2f}, "
          f"measured now{note}")
    print(f"\n== {len(jobs)} student runs, {min(args.jobs, len(jobs))} at a time; each run's log in its folder "
          f"under {out_dir}/")

    def stopped(finished: int) -> Interrupted:
        """The Interrupted error of the student runs stopped after ``finished`` of them; marks out_dir as an
        interrupted demo's, which a rerun given it as --out-dir goes on in."""
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, INTERRUPTED), "w") as f:
            f.write(shlex.join(["python3", "-m", "train", demo] + argv) + "\n")
        kept = f"{finished} finished student run{'' if finished == 1 else 's'}"
        if args.out_dir:
            return Interrupted(f"rerun the same command to resume from {out_dir}: "
                               + (f"its {kept} are kept, the others" if finished else "the student runs")
                               + " go on from their last checkpoints (if they wrote one)")
        return Interrupted(f"rerun the same command to resume from the cached teacher ({teacher_cfg['out_dir']}): the "
                           f"student runs start over in a new folder (add --out-dir {out_dir} to keep its {kept} and "
                           "go on with the others)")

    outcomes = run_jobs(jobs, min(args.jobs, len(jobs)), metric, start, stopped)
    params = {job.cfg["model"]: parameters_of(job.cfg, dataset) for job in jobs}
    student = next((outcome[0] for outcome in outcomes if outcome is not None), {})
    unit = "tokens" if teacher_cfg["task"] == "lm" else "images"
    results = {
        "metric": metric.name, "higher_is_better": metric.higher_is_better, "metric_label": metric.label,
        "teacher": {metric.name: teacher_value, "heldout_ce": teacher_ce, "model": teacher_cfg["model"],
                    "params": teacher_params, "cached": status == "cached", "path": teacher_cfg["out_dir"]},
        "runs": summarize(jobs, outcomes, metric, params),
        "title": plan.get("title", demo), "seeds": plan["select"]["seeds"] if args.select else plan["seeds"],
        "data": (f"training {unit}: {teacher_summary[f'train_{unit}']:,} for the teacher, "
                 f"{student.get(f'train_{unit}', 0):,} for each student; {student.get(f'test_{unit}', 0):,} "
                 f"{metric.label.split()[0]} {unit}"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
        "command": shlex.join(["python3", "-m", "train", demo] + argv),
        "wall_time_s": round(time.perf_counter() - start, 1), "jobs": min(args.jobs, len(jobs)),
    }
    os.makedirs(out_dir, exist_ok=True)
    print("\n" + write_report(results, out_dir))
    with contextlib.suppress(FileNotFoundError):  # the interrupted demo this one went on with is complete now
        os.remove(os.path.join(out_dir, INTERRUPTED))
    if args.select:
        print(f"best per loss on the validation split (paste into the plan's students):\n{best_points(results)}")
    print(f"results: {os.path.join(out_dir, RESULTS)}, table {TABLE}, plot {PLOT}")
    return 0
