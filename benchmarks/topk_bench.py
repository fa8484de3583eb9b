"""Sparse teacher against dense teacher in the fused linear loss: time and peak memory of one training step of
the LM head (issue 10).

    python -m benchmarks.topk_bench                   # CUDA when present, else the CPU shapes
    python -m benchmarks.topk_bench --device cpu --no-write

Providers (``benchmarks.linear_bench``'s, measured the same way: median forward+backward, peak extra memory):

* ``fused``: ``fused_linear_wttm_loss(h_s, W_s, h_t, W_t, y)``: the dense teacher's hidden states and head
  (same H and V as the student's), its GEMM and (C, V) buffer per chunk.
* ``topk[k=64]``: ``fused_linear_wttm_loss_topk(h_s, W_s, ids, logprobs, y)`` from the same teacher's top 64
  (int32 ids, fp32 log-probabilities), no teacher in memory.

Shapes: CPU V = 32000, H = 512; CUDA V = 128256, H = 4096, N = 16384; bf16. Writes the table into
benchmarks/RESULTS.md under "## Sparse teachers (issue 10)", replacing only this device's subsection.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from . import linear_bench
from .topk_storage import INTRO, SECTION

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = {  # device: (tokens, hidden, vocab, dtype)
    "cuda": ([16384], 4096, 128256, torch.bfloat16),
    "cpu": ([1024, 4096], 512, 32000, torch.bfloat16),
}
PROVIDERS = ("fused", "topk[k=64]")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")], help="N values, comma-separated")
    parser.add_argument("--reps", type=int, default=None, help="timed steps (default 5 on CUDA, 3 on CPU)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    tokens, hidden, vocab, dtype = SHAPES[args.device]
    tokens = args.tokens or tokens
    reps = args.reps or (5 if args.device == "cuda" else 3)
    measure = linear_bench.measure_cuda if args.device == "cuda" else linear_bench.measure_cpu
    results = {p: [] for p in PROVIDERS}
    for n in tokens:
        for p in PROVIDERS:
            results[p].append(measure(p, n, hidden, vocab, dtype, reps))
            print(f"{p:>12} N={n:>6}: {results[p][-1]}", flush=True)
    command = "python -m benchmarks.topk_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"### {args.device.upper()}: `fused_linear_wttm_loss_topk` (k = 64) against the dense teacher", "",
             f"{linear_bench.machine(args.device)}. Command: `{command.strip()}`. H={hidden} (student and teacher), "
             f"V={vocab}, {str(dtype).removeprefix('torch.')}, target given; time = median forward+backward of the "
             "LM head's loss, memory = peak extra (benchmarks/linear_bench.py's docstring says what is measured).",
             "", "| N | dense ms | top-k ms | dense / top-k time | dense MiB | top-k MiB | top-k / dense memory |",
             "|---|---|---|---|---|---|---|"]
    for i, n in enumerate(tokens):
        d, t = results["fused"][i], results["topk[k=64]"][i]
        lines.append(f"| {n} | {d['ms']:.1f} | {t['ms']:.1f} | {d['ms'] / t['ms']:.2f} | {d['peak_mib']:.0f} | "
                     f"{t['peak_mib']:.0f} | {t['peak_mib'] / d['peak_mib']:.2f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if not args.no_write:
        linear_bench.write_results(os.path.join(HERE, "RESULTS.md"), args.device, table, SECTION, INTRO)


if __name__ == "__main__":
    main()
