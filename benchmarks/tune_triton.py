"""Sweeps the Triton kernel's launch configuration and the split-row path's piece width on a CUDA device.

    python -m benchmarks.tune_triton [--rows 4096] [--vocab 32000 128256] [--split-rows 64]
                                     [--split-vocab 262144] [--time-budget 80] [--out DIR]

Times fused_wttm_loss forward+backward (the training path: for one program per row, one launch that reads z
and v and writes the gradient) with triton.testing.do_bench, and reports the effective bandwidth (2 inputs
read once + 1 gradient written, over time) as a fraction of a device copy measured in the same run.

* ``launch``: BLOCK_V x warps x stages at (rows, vocab), one program per row (``launch_config``).
* ``split``: piece widths of the split-row path at (split-rows, split-vocab), from one program per row
  (width = V) down to 8192 columns (``row_split``), the default choice marked.

This is a study tool: it swaps ``ttm_kernels.triton_kernels.launch_config`` / ``row_split`` for each row.
Rows are written to ``tune_triton.csv`` as they are measured, so a run cut short keeps what it measured; the
time budget stops the sweep between measurements.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import os
import time

import torch
import triton
import triton.testing

import ttm_kernels
from ttm_kernels import triton_kernels

BLOCKS = (4096, 8192, 16384)
WARPS = (4, 8, 16)
STAGES = (1, 2)
PIECE_WIDTHS = (65536, 32768, 16384, 8192)
FIELDS = ["sweep", "V", "N", "BLOCK_V", "num_warps", "num_stages", "piece_width", "default", "ms", "frac_copy_bw"]


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200)
    return 2 * src.numel() / (ms * 1e-3)


def training_step(rows: int, vocab: int):
    """fwd+bwd of fused_wttm_loss on bf16 logits, alternating two input sets so that one launch does not find
    the last one's data in L2."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    inputs = [((torch.randn(rows, vocab, device="cuda", generator=gen) * 8).bfloat16().requires_grad_(),
               (torch.randn(rows, vocab, device="cuda", generator=gen) * 8).bfloat16(),
               torch.randint(0, vocab, (rows,), device="cuda", generator=gen)) for _ in range(2)]
    step = itertools.count()

    def fwd_bwd():
        z, v, y = inputs[next(step) % 2]
        ttm_kernels.fused_wttm_loss(z, v, y, gamma=0.2, beta=2.0).backward()
        z.grad = None
    return fwd_bwd


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--split-rows", type=int, default=64)
    parser.add_argument("--split-vocab", type=int, default=262144)
    parser.add_argument("--time-budget", type=float, default=None, help="seconds for the whole sweep")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.time_budget if args.time_budget else float("inf")

    copy_bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)")
    default_config, default_split = triton_kernels.launch_config, triton_kernels.row_split
    path = os.path.join(args.out, "tune_triton.csv")

    def measure(writer, f, sweep, rows, vocab, row, fwd_bwd):
        try:
            ms = triton.testing.do_bench(fwd_bwd, warmup=10, rep=60)
        except Exception as exc:  # a configuration the compiler rejects (e.g. out of registers)
            print(f"{sweep} V={vocab} {row}: failed ({type(exc).__name__})")
            return
        finally:
            triton_kernels.launch_config, triton_kernels.row_split = default_config, default_split
        frac = 3 * rows * vocab * 2 / (ms * 1e-3) / copy_bw
        writer.writerow({"sweep": sweep, "V": vocab, "N": rows, **row, "ms": round(ms, 4),
                         "frac_copy_bw": round(frac, 3)})
        f.flush()
        print(f"{sweep} N={rows} V={vocab:>6} {row}: {ms:.3f} ms, {frac:.0%} of copy bandwidth", flush=True)

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        # The split-row path first: it is what a single program per row leaves idle.
        fwd_bwd = training_step(args.split_rows, args.split_vocab)
        chosen = default_split(args.split_rows, args.split_vocab, torch.device("cuda"))
        for width in sorted({args.split_vocab, chosen, *PIECE_WIDTHS}, reverse=True):
            if time.monotonic() > deadline:
                break
            triton_kernels.row_split = lambda n, V, device, width=width: min(width, V)
            measure(writer, f, "split", args.split_rows, args.split_vocab,
                    {"piece_width": width, "default": width == chosen}, fwd_bwd)
        for vocab in args.vocab:
            fwd_bwd = training_step(args.rows, vocab)
            configs = [default_config(vocab)] + [{"BLOCK_V": b, "num_warps": w, "num_stages": s}
                                                 for b, w, s in itertools.product(BLOCKS, WARPS, STAGES)
                                                 if b <= 2 * vocab]
            for i, config in enumerate(configs):
                if time.monotonic() > deadline:
                    break
                triton_kernels.launch_config = lambda V, config=config: config
                measure(writer, f, "launch", args.rows, vocab, {**config, "default": i == 0}, fwd_bwd)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
