"""``python -m train teacher-topk --config FILE out_dir=DIR k=64 [logprobs_dtype=float32] [key=value ...]``:
run the LM task's teacher (``teacher``, a built-in GPT with ``teacher_checkpoint`` or ``hf:<folder>``) once
over the training corpus of the config and write, per token, its top-k ids and log-probabilities into a store
(``train/topk_store.py``) that ``teacher_topk: DIR`` distils from without the teacher. A killed run resumes
where it stopped when started again with the same arguments.

Options besides the config keys: ``k`` (default 64), ``logprobs_dtype`` (float32, the default, or float16:
float32 keeps the tail bucket's loss within 1e-5, float16 moves confident rows by up to ~10%, see
benchmarks/RESULTS.md), ``windows_per_shard`` (default 1024); ``import=SERVED.jsonl`` builds the store from a
served teacher's output instead of running a teacher (train/topk_import.py says the format), ``vocab=N`` its
vocabulary size (default: the tokenizer's).

A writer holds the store folder's run lock (run_lock.py) while it works: a second one on the same out_dir is
refused before it touches anything. Ctrl-C (or SIGTERM) stops it with one line saying where a rerun resumes.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from . import checkpoint, config, run_lock
from .engine import autocast_factory
from .errors import ConfigError, Interrupted, UserError
from .eta import FirstSteps, duration
from .tasks import LanguageModelTask, lm_head
from .topk_store import LOGPROB_DTYPES, StoreWriter, corpus_fingerprint, written

OPTIONS = {"k": (64, int), "logprobs_dtype": ("float32", str), "windows_per_shard": (1024, int), "import": (None, str),
           "vocab": (0, int)}


def _split_options(pairs):
    options = {name: default for name, (default, _) in OPTIONS.items()}
    overrides = []
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in OPTIONS:
            overrides.append(pair)
            continue
        kind = OPTIONS[name][1]
        try:
            options[name] = kind(value)
        except ValueError as exc:
            raise ConfigError(f"{name} must be {kind.__name__}, got {value!r}") from exc
    if options["k"] < 1 or options["windows_per_shard"] < 1 or options["vocab"] < 0:
        raise ConfigError(f"k and windows_per_shard must be >= 1 and vocab >= 0, got {options['k']}, "
                          f"{options['windows_per_shard']} and {options['vocab']}")
    if options["logprobs_dtype"] not in LOGPROB_DTYPES:
        raise ConfigError(f"logprobs_dtype must be one of {tuple(LOGPROB_DTYPES)}, got {options['logprobs_dtype']!r}")
    return options, overrides


def _device(preference: str) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but CUDA is not available")
    return torch.device("cuda" if preference != "cpu" and torch.cuda.is_available() else "cpu")


def build_teacher(cfg, device):
    """The task's training data (tokenised as the teacher reads it) and the teacher, evaluation mode."""
    if cfg["task"] != "lm" or not cfg["teacher"]:
        raise ConfigError("teacher-topk runs the teacher of an LM task: the config needs task: lm and teacher: "
                          "(a gpt_* with teacher_checkpoint, or hf:<folder>)")
    task = LanguageModelTask({**cfg, "model": cfg["teacher"]}, device)
    data = task.build_data(0, 1)
    teacher = task._build(cfg["teacher"])
    if cfg["teacher_checkpoint"]:
        checkpoint.load_weights(teacher, cfg["teacher_checkpoint"], f"teacher {cfg['teacher']!r}")
    elif not cfg["teacher"].startswith("hf:"):
        raise ConfigError(f"teacher {cfg['teacher']!r} needs trained weights: set teacher_checkpoint")
    return data, teacher.eval().requires_grad_(False).to(device)


def writer_interrupted(out_dir: str, store: str = "the store") -> Interrupted:
    """The Interrupted error of a writer stopped now: a rerun keeps the complete shards of ``store``, in ``out_dir``,
    and writes the rest."""
    progress = written(out_dir)
    if progress is None:
        return Interrupted(f"rerun the same command to resume from the start of {store} (nothing was written to "
                           f"{out_dir} yet)")
    done, total = progress
    return Interrupted(f"rerun the same command to resume from window {done} of {total} of {store}: the complete "
                       f"shards in {out_dir} are kept")


def write_store(cfg, options, log=print):
    """Run the teacher over the training windows into the store in ``cfg['out_dir']``, holding its run lock."""
    with run_lock.hold(cfg["out_dir"]):
        return _write_store(cfg, options, log)


def _write_store(cfg, options, log):
    began = time.perf_counter()  # the time estimate counts the set-up too
    device = _device(cfg["device"])
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    data, teacher = build_teacher(cfg, device)
    inputs = data.train.inputs
    k, head = options["k"], lm_head(teacher)
    vocab = head.weight.shape[0]
    if k > vocab:
        raise ConfigError(f"k must be <= the teacher's vocabulary {vocab}, got {k}")
    writer = StoreWriter(cfg["out_dir"], {
        "teacher": cfg["teacher"], "teacher_checkpoint": cfg["teacher_checkpoint"], "vocab": vocab, "k": k,
        "ids_dtype": "int32", "logprobs_dtype": options["logprobs_dtype"], "corpus": corpus_fingerprint(inputs),
        "seq_len": inputs.shape[1], "windows": inputs.shape[0], "windows_per_shard": options["windows_per_shard"]})
    if writer.complete:
        log(f"nothing to do: {cfg['out_dir']} already holds the complete store")
        return writer.manifest
    start = writer.next_window
    if start:
        log(f"resuming {cfg['out_dir']} after {start} of {inputs.shape[0]} windows")
    autocast, _ = autocast_factory(cfg, device)
    dtype = LOGPROB_DTYPES[options["logprobs_dtype"]]
    from tqdm import tqdm

    bar = tqdm(total=inputs.shape[0], initial=start, unit="window", desc="teacher top-k", disable=not cfg["progress"])
    shards = range(start, inputs.shape[0], options["windows_per_shard"])
    batches = sum(-(-min(options["windows_per_shard"], inputs.shape[0] - first) // cfg["test_batch_size"])
                  for first in shards)
    timer, done = FirstSteps(batches, device), 0
    for first in shards:
        windows = inputs[first:first + options["windows_per_shard"]]
        ids, logprobs = [], []
        for batch in windows.split(cfg["test_batch_size"]):
            with torch.no_grad(), autocast():
                hidden = teacher(batch.to(device))
            logits = torch.nn.functional.linear(hidden.to(head.weight.dtype), head.weight, head.bias)
            top = torch.log_softmax(logits.float(), -1).topk(k, dim=-1)
            ids.append(top.indices.to(torch.int32).cpu().numpy())
            logprobs.append(top.values.cpu().numpy().astype(dtype))
            bar.update(len(batch))
            done += 1
            per_batch = timer.step_done()
            if per_batch is not None:
                total = time.perf_counter() - began + per_batch * (batches - done)
                log(f"teacher top-k: about {duration(total)} on this machine (measured over the first {timer.steps} "
                    "batches)")
        writer.write_shard(np.concatenate(ids), np.concatenate(logprobs))
    bar.close()
    m = writer.manifest
    log(f"wrote {m['tokens']} tokens x top-{k} of {cfg['teacher']} to {cfg['out_dir']} "
        f"({len(m['shards'])} shards, {k * (4 + np.dtype(dtype).itemsize)} bytes per token)")
    return m


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m train teacher-topk", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the LM task's YAML config (its teacher and corpus)")
    parser.add_argument("pairs", nargs="*", metavar="key=value", help="k, logprobs_dtype, windows_per_shard, "
                        "import, vocab, or config keys (out_dir = the store's folder)")
    args = parser.parse_args(argv)
    try:
        options, overrides = _split_options(args.pairs)
        if not any(pair.startswith("out_dir=") for pair in overrides):
            raise ConfigError("pass out_dir=DIR: the folder of the store (a new one, or one to resume)")
        cfg = config.load(args.config, overrides)
        try:
            if options["import"]:
                from .topk_import import import_jsonl
                import_jsonl(cfg, options)
            else:
                write_store(cfg, options)
        except KeyboardInterrupt:
            raise writer_interrupted(cfg["out_dir"]) from None
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0
