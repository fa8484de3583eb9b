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

``--store`` measures the top-k store instead (train/topk_store.py, CPU, a temporary folder): bytes per token,
and write throughput (``StoreWriter.write_shard``: np.save, fsync, rename, SHA-256 of each file) and read
throughput (``TopkStore.read`` of random batches of windows from the memory-mapped shards, after
``TopkStore`` has checked every shard's checksum) in tokens per second.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

from . import linear_bench
from .topk_storage import INTRO, SECTION

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = {  # device: (tokens, hidden, vocab, dtype)
    "cuda": ([16384], 4096, 128256, torch.bfloat16),
    "cpu": ([1024, 4096], 512, 32000, torch.bfloat16),
}
PROVIDERS = ("fused", "topk[k=64]")


def store_throughput(k=64, seq_len=512, windows=512, windows_per_shard=64, batch=16, vocab=128256):
    """Rows of the store table: (logprobs dtype, bytes per token, write tokens/s, read tokens/s)."""
    sys.path.insert(0, os.path.dirname(HERE))
    from train.topk_store import LOGPROB_DTYPES, StoreWriter, TopkStore

    gen = np.random.default_rng(0)
    ids = gen.integers(0, vocab, (windows_per_shard, seq_len, k), dtype=np.int32)
    rows = []
    for name, dtype in LOGPROB_DTYPES.items():
        logprobs = -gen.exponential(3.0, (windows_per_shard, seq_len, k)).astype(dtype)
        with tempfile.TemporaryDirectory() as folder:
            writer = StoreWriter(folder, {
                "teacher": "synthetic", "teacher_checkpoint": None, "vocab": vocab, "k": k, "ids_dtype": "int32",
                "logprobs_dtype": name, "corpus": "synthetic", "seq_len": seq_len, "windows": windows,
                "windows_per_shard": windows_per_shard})
            start = time.perf_counter()
            for _ in range(windows // windows_per_shard):
                writer.write_shard(ids, logprobs)
            write = windows * seq_len / (time.perf_counter() - start)
            store = TopkStore(folder)
            order = torch.from_numpy(gen.permutation(windows))
            start = time.perf_counter()
            for first in range(0, windows, batch):
                store.read(order[first:first + batch])
            read = windows * seq_len / (time.perf_counter() - start)
        rows.append((name, k * (4 + np.dtype(dtype).itemsize), write, read))
    return rows


def store_table(command):
    lines = ["### Store - bytes per token and throughput (CPU)", "",
             f"{linear_bench.machine('cpu')}. Command: `{command}`. k = 64 int32 ids, 512 windows of 512 tokens "
             "(262144 tokens) in shards of 64 windows, reads of 16 random windows; the dense alternative, bf16 "
             "logits at V = 128256, is 256.5 KB per token.", "",
             "| log-probabilities | bytes per token | write tokens/s | read tokens/s |", "|---|---|---|---|"]
    for name, size, write, read in store_throughput():
        lines.append(f"| {name} | {size} | {write:,.0f} | {read:,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")], help="N values, comma-separated")
    parser.add_argument("--reps", type=int, default=None, help="timed steps (default 5 on CUDA, 3 on CPU)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--store", action="store_true", help="measure the top-k store instead (CPU)")
    args = parser.parse_args(argv)
    command = ("python -m benchmarks.topk_bench " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    if args.store:
        table = store_table(command)
        print(table)
        if not args.no_write:
            linear_bench.write_results(os.path.join(HERE, "RESULTS.md"), "store", table, SECTION, INTRO)
        return
    tokens, hidden, vocab, dtype = SHAPES[args.device]
    tokens = args.tokens or tokens
    reps = args.reps or (5 if args.device == "cuda" else 3)
    measure = linear_bench.measure_cuda if args.device == "cuda" else linear_bench.measure_cpu
    results = {p: [] for p in PROVIDERS}
    for n in tokens:
        for p in PROVIDERS:
            results[p].append(measure(p, n, hidden, vocab, dtype, reps))
            print(f"{p:>12} N={n:>6}: {results[p][-1]}", flush=True)
    lines = [f"### {args.device.upper()} - `fused_linear_wttm_loss_topk` (k = 64) against the dense teacher", "",
             f"{linear_bench.machine(args.device)}. Command: `{command}`. H={hidden} (student and teacher), "
             f"V={vocab}, {str(dtype).removeprefix('torch.')}, target given; time = median forward+backward of the "
             "LM head's loss, memory = peak extra (benchmarks/linear_bench.py's docstring says what is measured).",
             "", "| N | dense ms | top-k ms | dense / top-k time | dense MiB | top-k MiB | top-k / dense memory |",
             "|---|---|---|---|---|---|---|"]
    for i, n in enumerate(tokens):
        d, t = results["fused"][i], results["topk[k=64]"][i]
        lines.append(f"| {n} | {d['ms']:.1f} | {t['ms']:.1f} | {d['ms'] / t['ms']:.2f} | {d['peak_mib']:.0f} | "
                     f"{t['peak_mib']:.0f} | {t['peak_mib'] / d['peak_mib']:.2f} |")
    teacher_mib = (hidden * vocab * dtype.itemsize) / 2**20
    lines += ["", "- Memory beyond the peak extra: the dense provider also holds the teacher's head "
              f"({teacher_mib:.0f} MiB here) and hidden states (N x {hidden} x {dtype.itemsize} bytes), in a real run the whole teacher "
              "model; the top-k provider holds N x 64 x 8 bytes of ids and log-probabilities. The peak extra of both "
              "is set by the head's weight gradient (its fp32 accumulator and its cast), which the sparse teacher "
              "does not change; it removes the teacher's (chunk, V) buffer and GEMM."]
    if args.device == "cpu":
        lines.append("- CPU times are indicative only on a shared machine (load average above); the step is bound by "
                     "its GEMMs: the student's forward and two backward ones for both providers, plus the teacher's "
                     "for the dense one (at most 4/3 from the GEMMs alone).")
    table = "\n".join(lines) + "\n"
    print(table)
    if not args.no_write:
        linear_bench.write_results(os.path.join(HERE, "RESULTS.md"), args.device, table, SECTION, INTRO)


if __name__ == "__main__":
    main()
