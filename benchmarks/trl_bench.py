"""TRL's distillation loss, Liger's and ours side by side in one run: time and peak memory of one training step
of the LM head, for the forward KL and the JSD (issue 20).

    python -m benchmarks.trl_bench                    # CUDA when present, else the CPU shapes
    python -m benchmarks.trl_bench --device cpu --tokens 256 --vocab 4096 --no-write    # a smoke run

Providers, each the loss of ``trl.DistillationTrainer`` on the same student and teacher hidden states and LM
heads (every token counted, temperature 1), forward+backward (the student's hidden states and head get
gradients):

* ``ours``: ``ttm_kernels.integrations.trl.chunked_divergence_loss`` (what ``install()`` puts in the trainer);
* ``trl``: TRL 1.16's own ``_chunked_divergence_loss`` (its Triton kernels on CUDA, its torch tiles elsewhere);
* ``liger``: Liger-Kernel's ``LigerFusedLinearJSDLoss(weight_hard_loss=0, weight_soft_loss=1, beta)``
  (``compiled`` on CUDA, not on the CPU), the same numbers.

Divergences: ``kl`` (beta 0, the forward KL) and ``jsd`` (beta 0.5). A provider whose package is missing is
left out, with a line saying so. Time and memory are measured as ``benchmarks.linear_bench`` measures them
(median of ``--reps`` steps after a warm-up; peak extra bytes; on the CPU one subprocess per measurement), all
providers in the same run, so that the ratios (``trl`` / ``ours``, ``liger`` / ``ours``) compare like with
like. Writes the table into benchmarks/RESULTS.md under "## TRL and Liger distillation losses (issue 20)",
replacing only this device's subsection (``--no-write``: print only).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from . import linear_bench

HERE = os.path.dirname(os.path.abspath(__file__))
SECTION = "## TRL and Liger distillation losses (issue 20)"
INTRO = ("`python -m benchmarks.trl_bench` (benchmarks/trl_bench.py): one LM-head training step of TRL's "
         "`DistillationTrainer` loss computed by `ttm_kernels.integrations.trl.chunked_divergence_loss` (ours), "
         "TRL's own `_chunked_divergence_loss` and Liger's `LigerFusedLinearJSDLoss`, forward KL and JSD.\n")
PROVIDERS = ("ours", "trl", "liger")
DIVERGENCES = {"kl": 0.0, "jsd": 0.5}
SHAPES = {  # device: (tokens, hidden, vocab, dtype)
    "cuda": ([4096, 16384], 4096, 128256, torch.bfloat16),
    "cpu": ([512, 2048], 256, 32000, torch.float32),
}
PACKAGES = {"trl": "trl", "liger": "liger_kernel"}


def available(provider) -> bool:
    return provider not in PACKAGES or importlib.util.find_spec(PACKAGES[provider]) is not None


def make_inputs(n, hidden, vocab, dtype, device, seed=0):
    """``linear_bench``'s inputs (logits of standard deviation about 4), the teacher 1.5 times wider."""
    x = linear_bench.make_inputs(n, hidden, vocab, dtype, device, seed)
    gen = torch.Generator(device).manual_seed(seed + 1)
    teacher_hidden = hidden * 3 // 2
    x["h_t"] = torch.randn(n, teacher_hidden, generator=gen, device=device).to(dtype)
    x["w_t"] = (torch.randn(vocab, teacher_hidden, generator=gen, device=device) * 4 / teacher_hidden**0.5).to(dtype)
    return x


def step_fn(provider, beta, x):
    """One forward+backward of ``provider``; gradients land in x["h_s"].grad and x["w_s"].grad."""
    mask = torch.ones(x["y"].shape, dtype=torch.long, device=x["y"].device)
    if provider == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta,
                                          compiled=x["h_s"].device.type == "cuda")

        def step():
            loss_fn(x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["y"]).backward()
        return step
    if provider == "trl":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss as loss_fn
    else:
        from ttm_kernels.integrations.trl import chunked_divergence_loss as loss_fn

    def step():
        loss_fn(x["h_s"], x["h_t"], x["w_s"], x["w_t"], mask, beta)[0].backward()
    return step


def measure_cuda(provider, beta, n, hidden, vocab, dtype, reps):
    x = make_inputs(n, hidden, vocab, dtype, "cuda")
    step = step_fn(provider, beta, x)
    try:
        step()  # warm-up: compilation, cuBLAS handles
        linear_bench.clear_grads(x)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        times = []
        for _ in range(reps):
            linear_bench.clear_grads(x)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return {"ms": statistics.median(times), "peak_mib": peak / linear_bench.MIB}
    except torch.cuda.OutOfMemoryError:
        return {"ms": float("nan"), "peak_mib": float("nan"), "note": "OOM"}
    finally:
        del x, step
        torch.cuda.empty_cache()


def cpu_worker(provider, beta, n, hidden, vocab, dtype, reps):
    """Runs in its own process (``linear_bench``'s CPU measurement); prints one JSON line."""
    x = make_inputs(n, hidden, vocab, dtype, "cpu")
    step = step_fn(provider, beta, x)
    step()
    linear_bench.clear_grads(x)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss = linear_bench._proc_status_kib("VmRSS")
    step()
    peak_kib = linear_bench._proc_status_kib("VmHWM") - rss
    times = []
    for _ in range(reps):
        linear_bench.clear_grads(x)
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    print(json.dumps({"ms": statistics.median(times), "peak_mib": peak_kib / 1024}))


def measure_cpu(provider, beta, n, hidden, vocab, dtype, reps):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TRL_EXPERIMENTAL_SILENCE="1")
    cmd = [sys.executable, "-m", "benchmarks.trl_bench", "--worker", provider, str(beta), str(n), str(hidden),
           str(vocab), str(dtype).removeprefix("torch."), str(reps)]
    out = subprocess.run(cmd, env=env, cwd=os.path.dirname(HERE), capture_output=True, text=True)
    if out.returncode != 0:
        return {"ms": float("nan"), "peak_mib": float("nan"), "note": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def render(device, results, providers, tokens, hidden, vocab, dtype, command, missing):
    """The table: one row per (divergence, N), time and memory per provider and their ratios to ours."""
    others = [p for p in providers if p != "ours"]
    lines = [f"### {device.upper()}", "",
             f"{linear_bench.machine(device)}. Command: `{command}`. H={hidden} (teacher {hidden * 3 // 2}), "
             f"V={vocab}, {str(dtype).removeprefix('torch.')}, every token counted, temperature 1; time = median "
             "forward+backward, memory = peak extra (benchmarks/linear_bench.py says what is measured).", "",
             "| divergence | N | " + " | ".join(f"{p} ms" for p in providers) + " | "
             + " | ".join(f"{p} MiB" for p in providers) + " | "
             + " | ".join(f"{p}/ours time | {p}/ours memory" for p in others) + " |",
             "|---" * (2 + 2 * len(providers) + 2 * len(others)) + "|"]
    notes = [f"{p}: not installed, left out" for p in missing]
    for divergence in DIVERGENCES:
        for i, n in enumerate(tokens):
            rows = {p: results[divergence][p][i] for p in providers}
            ours = rows["ours"]
            cells = ([f"{rows[p]['ms']:.1f}" for p in providers] + [f"{rows[p]['peak_mib']:.0f}" for p in providers]
                     + [f"{rows[p]['ms'] / ours['ms']:.2f} | {rows[p]['peak_mib'] / ours['peak_mib']:.2f}"
                        for p in others])
            lines.append(f"| {divergence} | {n} | " + " | ".join(cells) + " |")
            notes += [f"{p}, {divergence}, N={n}: {rows[p]['note']}" for p in providers if "note" in rows[p]]
    return "\n".join(lines + [""] + [f"- {note}" for note in notes]) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")], help="N values, comma-separated")
    parser.add_argument("--vocab", type=int, help="V (default: the device's shape)")
    parser.add_argument("--hidden", type=int, help="the student's H (default: the device's shape)")
    parser.add_argument("--reps", type=int, default=None, help="timed steps (default 5 on CUDA, 3 on CPU)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write RESULTS.md")
    parser.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        provider, beta, n, hidden, vocab, dtype, reps = args.worker
        cpu_worker(provider, float(beta), int(n), int(hidden), int(vocab), getattr(torch, dtype), int(reps))
        return

    tokens, hidden, vocab, dtype = SHAPES[args.device]
    tokens, hidden, vocab = args.tokens or tokens, args.hidden or hidden, args.vocab or vocab
    reps = args.reps or (5 if args.device == "cuda" else 3)
    measure = measure_cuda if args.device == "cuda" else measure_cpu
    providers = [p for p in PROVIDERS if available(p)]
    missing = [p for p in PROVIDERS if p not in providers]
    results = {d: {p: [] for p in providers} for d in DIVERGENCES}
    for divergence, beta in DIVERGENCES.items():
        for n in tokens:
            for p in providers:
                results[divergence][p].append(measure(p, beta, n, hidden, vocab, dtype, reps))
                print(f"{divergence:>4} {p:>6} N={n:>6}: {results[divergence][p][-1]}", flush=True)
    command = "python -m benchmarks.trl_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    table = render(args.device, results, providers, tokens, hidden, vocab, dtype, command.strip(), missing)
    print(table)
    if not args.no_write:
        linear_bench.write_results(os.path.join(HERE, "RESULTS.md"), args.device, table, section=SECTION,
                                   intro=INTRO)


if __name__ == "__main__":
    main()
