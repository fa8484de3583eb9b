"""CPU benchmark of the fused WTTM loss (issue 3): the C++ kernel against the paper's code, eager and compiled.

    python -m benchmarks.cpu_bench                      # N = 2048 rows, V = 32000, fp32, 2 threads

Every provider computes ``ce + beta * WTTM`` (gamma = 0.2) and its gradient on the same inputs:

* ``fused``: ``ttm_kernels.fused_wttm_loss(..., backend="cpu")``, the C++ extension;
* ``eager``: ``ttm_kernels.reference.paper_wttm_loss``, the paper's code line for line;
* ``compile``: ``torch.compile`` of that same function (default mode).

Time: one step is ``z.grad = None; loss = f(z, v, y); loss.backward()``, so it includes allocating and
first-touching the (N, V) gradient. After warm-up steps (which also compile), the providers are timed in
turns, round-robin, so that a change in the machine's load hits all of them alike; the median per provider
is reported, with the spread (min, max).

Memory: each provider runs in a fresh subprocess, with glibc's mmap threshold pinned at 64 KiB so that
every tensor of 64 KiB or more is mapped on allocation and unmapped when freed (the resident set then
follows the live tensors). After warm-up, with the previous gradient freed, the peak resident set size is
reset (``/proc/self/clear_refs``), one step runs, and the report gives VmHWM minus the resident size before
the step: the peak extra memory of forward + backward, the (N, V) gradient that the step leaves in
``z.grad`` included. It is memory of the whole process (allocator slack and thread stacks included), not
just of tensors.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

import ttm_kernels
from ttm_kernels import reference

PROVIDERS = ("fused", "eager", "compile")
GAMMA = 0.2
BETA = 1.0
MIB = 2**20


def make_inputs(rows: int, vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, vocab, generator=gen) * 3).requires_grad_()
    teacher = torch.randn(rows, vocab, generator=gen) * 3
    target = torch.randint(0, vocab, (rows,), generator=gen)
    return student, teacher, target


def loss_function(provider: str):
    if provider == "fused":
        return lambda z, v, y: ttm_kernels.fused_wttm_loss(z, v, y, gamma=GAMMA, beta=BETA, backend="cpu")
    paper = lambda z, v, y: reference.paper_wttm_loss(z, v, y, gamma=GAMMA, beta=BETA)  # noqa: E731
    if provider == "eager":
        return paper
    if provider == "compile":
        return torch.compile(paper)
    raise ValueError(f"unknown provider {provider!r}")


def step(loss_fn, student, teacher, target) -> None:
    student.grad = None
    loss_fn(student, teacher, target).backward()


def _memory_kib() -> dict[str, int]:
    status = open("/proc/self/status").read()
    return {key: int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) for key in ("VmRSS", "VmHWM")}


def measure_memory(provider: str, rows: int, vocab: int, threads: int, warmup: int) -> dict:
    """Peak extra resident memory (MiB) of one forward + backward step, in this process."""
    torch.set_num_threads(threads)
    student, teacher, target = make_inputs(rows, vocab)
    loss_fn = loss_function(provider)
    for _ in range(warmup):
        step(loss_fn, student, teacher, target)
    student.grad = None
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident size
    before = _memory_kib()["VmRSS"]
    step(loss_fn, student, teacher, target)
    peak = _memory_kib()["VmHWM"]
    return {"provider": provider, "peak_extra_mib": (peak - before) / 1024}


def memory_in_subprocess(provider: str, args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    command = [sys.executable, "-m", "benchmarks.cpu_bench", "--memory-worker", provider, "--rows", str(args.rows),
               "--vocab", str(args.vocab), "--threads", str(args.threads), "--warmup", str(args.warmup)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_time(args) -> dict[str, list[float]]:
    torch.set_num_threads(args.threads)
    student, teacher, target = make_inputs(args.rows, args.vocab)
    loss_fns = {provider: loss_function(provider) for provider in args.providers}
    for provider, loss_fn in loss_fns.items():
        for _ in range(args.warmup):
            step(loss_fn, student, teacher, target)
    seconds = {provider: [] for provider in loss_fns}
    for _ in range(args.repeats):
        for provider, loss_fn in loss_fns.items():
            start = time.perf_counter()
            step(loss_fn, student, teacher, target)
            seconds[provider].append(time.perf_counter() - start)
    return seconds


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], check=True, capture_output=True, text=True).stdout
        return re.search(r"Model name:\s*(.+)", out).group(1).strip()
    except (OSError, subprocess.CalledProcessError, AttributeError):
        return platform.processor() or "unknown"


def report(args, seconds: dict[str, list[float]], memory: dict[str, dict]) -> str:
    from ttm_kernels import cpu_kernels

    gradient_mib = args.rows * args.vocab * 4 / MIB
    median = {provider: statistics.median(times) for provider, times in seconds.items()}
    lines = [
        f"date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}; CPU: {cpu_model()}, "
        f"{args.threads} threads (torch.set_num_threads); CPU kernels: {cpu_kernels.cpu_isa()}; "
        f"torch {torch.__version__}; load average before the run: {args.load_before}",
        f"N = {args.rows}, V = {args.vocab}, fp32, gamma = {GAMMA}, with target; forward + backward; "
        f"median of {args.repeats} round-robin repetitions after {args.warmup} warm-up steps; "
        f"one (N, V) fp32 gradient = {gradient_mib:.0f} MiB",
        "",
        "| provider | fwd+bwd median (ms) | min - max (ms) | speed-up of fused | peak extra memory (MiB) |",
        "|---|---|---|---|---|",
    ]
    for provider in args.providers:
        times = seconds[provider]
        speedup = median[provider] / median["fused"] if "fused" in median else float("nan")
        mem = memory.get(provider, {}).get("peak_extra_mib", float("nan"))
        lines.append(f"| {provider} | {median[provider] * 1e3:.0f} | {min(times) * 1e3:.0f} - {max(times) * 1e3:.0f} "
                     f"| {speedup:.2f}x | {mem:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--memory-worker", choices=PROVIDERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_worker:
        print(json.dumps(measure_memory(args.memory_worker, args.rows, args.vocab, args.threads, args.warmup)))
        return
    if not ttm_kernels.cpu_extension_available():
        sys.exit("the C++ extension ttm_kernels._C is not built: pip install --no-build-isolation -e .")
    args.load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    memory = {} if args.no_memory else {provider: memory_in_subprocess(provider, args) for provider in args.providers}
    seconds = measure_time(args)
    print(report(args, seconds, memory))


if __name__ == "__main__":
    main()
