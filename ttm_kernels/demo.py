"""Checks the fused losses on a realistic batch against the float64 reference and prints a table.

    python -m ttm_kernels.demo [--rows 256] [--vocab 32000] [--device cpu|cuda]

Each available backend computes WTTM, TTM and KD (with hard labels, a quarter of the rows ignored) and
their student gradients; the table gives each one's error against the float64 reference and its time.
"""
from __future__ import annotations

import argparse
import time

import torch

from . import fused_kd_loss, fused_ttm_loss, fused_wttm_loss, reference
from ._ops import cpu_extension_available, triton_available, triton_interpreted

LOSSES = {
    "wttm": (fused_wttm_loss, reference.wttm_loss, {"gamma": 0.2, "beta": 4.0}),
    "ttm": (fused_ttm_loss, reference.ttm_loss, {"gamma": 0.1, "beta": 45.0}),
    "kd": (fused_kd_loss, reference.kd_loss, {"temperature": 4.0, "beta": 0.9, "ce_weight": 0.1}),
}


def _backends(device: str) -> list[str]:
    backends = ["torch"]
    if device == "cpu" and cpu_extension_available():
        backends.append("cpu")
    if triton_available() and (device == "cuda" or triton_interpreted()):
        backends.append("triton")
    return backends


def _run(fn, student, teacher, target, **kw):
    student = student.detach().clone().requires_grad_()
    if student.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = fn(student, teacher, target, **kw)
    loss.backward()
    if student.is_cuda:
        torch.cuda.synchronize()
    return loss.detach().double(), student.grad.double(), time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.rows, args.vocab)
    teacher = (torch.randn(shape, generator=gen, dtype=torch.float64) * 8).to(args.device)
    # A student that half agrees with its teacher, as during distillation.
    student = (0.5 * teacher.cpu() + torch.randn(shape, generator=gen, dtype=torch.float64) * 6).to(args.device)
    target = torch.randint(0, args.vocab, (args.rows,), generator=gen)
    target[torch.rand(args.rows, generator=gen) < 0.25] = -100
    target = target.to(args.device)

    print(f"{args.rows} rows x {args.vocab} classes on {args.device}, float32 inputs, errors against float64\n")
    header = f"{'loss':<6}{'backend':<9}{'value':>14}{'rel. error':>12}{'grad max err':>14}{'time ms':>10}"
    print(header)
    print("-" * len(header))
    for name, (fused, ref, kw) in LOSSES.items():
        ref_loss, ref_grad, _ = _run(ref, student, teacher, target, **kw)
        grad_scale = ref_grad.abs().max().item()
        for backend in _backends(args.device):
            loss, grad, seconds = _run(fused, student.float(), teacher.float(), target, backend=backend, **kw)
            rel = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
            grad_err = (grad - ref_grad).abs().max().item() / grad_scale
            print(f"{name:<6}{backend:<9}{loss.item():>14.6f}{rel:>12.2e}{grad_err:>14.2e}{seconds * 1e3:>10.1f}")
    print("\ngrad max err: max |grad - grad_ref| / max |grad_ref|. Times are single cold calls, not benchmarks;"
          " see `python -m benchmarks`.")


if __name__ == "__main__":
    main()
