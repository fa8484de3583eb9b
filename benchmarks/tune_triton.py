"""Sweeps the Triton kernel's launch configuration (BLOCK_V, warps, stages) on a CUDA device.

    python -m benchmarks.tune_triton [--rows 4096] [--vocab 32000 128256] [--out DIR]

For each configuration it times fused_wttm_loss forward+backward (the training path: one launch that
reads z and v and writes the gradient) with CUDA-event medians, and reports the effective bandwidth
(2 inputs read once + 1 gradient written, over time) as a fraction of a device copy measured in the same
run. This is a study tool: it swaps ``ttm_kernels.triton_kernels.launch_config`` for each row.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import os

import torch
import triton
import triton.testing

import ttm_kernels
from ttm_kernels import triton_kernels

BLOCKS = (4096, 8192, 16384)
WARPS = (4, 8, 16)
STAGES = (1, 2)


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200)
    return 2 * src.numel() / (ms * 1e-3)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)

    copy_bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)")
    default = triton_kernels.launch_config
    path = os.path.join(args.out, "tune_triton.csv")
    fields = ["V", "N", "BLOCK_V", "num_warps", "num_stages", "default", "ms", "frac_copy_bw"]
    with open(path, "w", newline="") as f:  # written row by row, so a run cut short keeps what it measured
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for vocab in args.vocab:
            gen = torch.Generator(device="cuda").manual_seed(0)
            # Two input sets, alternated, so that one launch does not find the last one's data in L2.
            inputs = [((torch.randn(args.rows, vocab, device="cuda", generator=gen) * 8).bfloat16(),
                       (torch.randn(args.rows, vocab, device="cuda", generator=gen) * 8).bfloat16(),
                       torch.randint(0, vocab, (args.rows,), device="cuda", generator=gen)) for _ in range(2)]
            for z, _, _ in inputs:
                z.requires_grad_()
            step = itertools.count()

            def fwd_bwd():
                z, v, y = inputs[next(step) % 2]
                ttm_kernels.fused_wttm_loss(z, v, y, gamma=0.2, beta=2.0).backward()
                z.grad = None

            bytes_moved = 3 * args.rows * vocab * 2
            configs = [default(vocab)] + [{"BLOCK_V": b, "num_warps": w, "num_stages": s}
                                          for b, w, s in itertools.product(BLOCKS, WARPS, STAGES) if b <= 2 * vocab]
            for i, config in enumerate(configs):
                triton_kernels.launch_config = lambda V, config=config: config
                try:
                    ms = triton.testing.do_bench(fwd_bwd, warmup=10, rep=60)
                except Exception as exc:  # a configuration the compiler rejects (e.g. out of registers)
                    print(f"V={vocab} {config}: failed ({type(exc).__name__})")
                    continue
                finally:
                    triton_kernels.launch_config = default
                frac = bytes_moved / (ms * 1e-3) / copy_bw
                writer.writerow({"V": vocab, "N": args.rows, **config, "default": i == 0, "ms": round(ms, 4),
                                 "frac_copy_bw": round(frac, 3)})
                f.flush()
                print(f"V={vocab:>6} {'default ' if i == 0 else ''}{config}: {ms:.3f} ms, "
                      f"{frac:.0%} of copy bandwidth", flush=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
