"""How the storage dtype of a sparse teacher's log-probabilities moves the loss (issue 10).

    python -m benchmarks.topk_storage            # writes "### Storage" of "## Sparse teachers (issue 10)"
    python -m benchmarks.topk_storage --no-write

Under the power transform a rounding residue counts: the tail mass p_R = 1 - sum_S p of a confident teacher
is small, the stored log-probabilities' rounding moves it by about eps * |log p|, and p_R**gamma magnifies
that (a residue of 1e-7 weighs 1e-7**0.2 = 0.04). For synthetic teachers (V = 32000 Gaussian logits of
spread sigma: sigma 2 flat, 4 LM-like, 8 confident) and a student that partly agrees with them, the per-row
distillation term (float64 reference, ce_weight 0) from log-probabilities rounded to fp32 / fp16 / bf16 is
compared with the one from float64 log-probabilities: the median and largest relative error over the rows.
The last column is the same for fp32 storage with p_R summed in fp32 instead of float64 (as the kernels
do): the WTTM weight's relative error.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from ttm_kernels import reference

from .linear_bench import write_results

HERE = os.path.dirname(os.path.abspath(__file__))
SECTION = "## Sparse teachers (issue 10)"
INTRO = ("`benchmarks/topk_bench.py` and `benchmarks/topk_storage.py`: the sparse-teacher losses "
         "(`fused_*_loss_topk`, `fused_linear_*_loss_topk`).\n")
VOCAB, ROWS = 32000, 256
SPREADS = {"flat (sigma 2)": 2.0, "LM-like (sigma 4)": 4.0, "confident (sigma 8)": 8.0}
LOSSES = {"WTTM g=0.2": dict(teacher_scale=0.2, weighted=True), "TTM g=0.2": dict(teacher_scale=0.2, weighted=False),
          "KD T=4": dict(student_scale=0.25, teacher_scale=0.25, kl_scale=16.0, weighted=False)}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def problem(spread, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(ROWS, VOCAB, generator=gen, dtype=torch.float64) * spread
    z = 0.8 * v + 2.0 * torch.randn(ROWS, VOCAB, generator=gen, dtype=torch.float64)
    top = torch.log_softmax(v, -1).topk(k, -1)
    return z, top.indices, top.values


def relative_errors(z, ids, logprobs, dtype, tail, params):
    exact = reference.topk_loss_rows(z, ids, logprobs, tail=tail, ce_weight=0.0, **params)["loss"]
    stored = logprobs.to(dtype).double()
    rounded = reference.topk_loss_rows(z, ids, stored, tail=tail, ce_weight=0.0, **params)["loss"]
    err = ((rounded - exact).abs() / exact.abs()).sort().values
    return err[len(err) // 2].item(), err[-1].item()


def fp32_sum_weight_error(logprobs, gamma=0.2):
    """Largest relative error of the bucket's U = sum p**g + p_R**g when p_R = 1 - sum p is summed in fp32."""
    stored = logprobs.float()
    powers = torch.exp(gamma * stored.double()).sum(-1)
    exact = powers + (1 - torch.exp(stored.double()).sum(-1)).clamp_min(0) ** gamma
    fp32 = powers + (1 - torch.exp(stored).sum(-1)).clamp_min(0).double() ** gamma
    return ((fp32 - exact).abs() / exact).max().item()


def run(ks, tails):
    lines = ["| teacher | k | median p_R | tail | loss | fp32 median / max | fp16 median / max | bf16 median / max |"
             " U error, p_R summed in fp32 |", "|---" * 9 + "|"]
    for regime, spread in SPREADS.items():
        for k in ks:
            z, ids, logprobs = problem(spread, k)
            p_tail = (1 - torch.exp(logprobs).sum(-1)).median().item()
            u_err = fp32_sum_weight_error(logprobs)
            for tail in tails:
                for name, params in LOSSES.items():
                    cells = []
                    for dtype in DTYPES:
                        median, worst = relative_errors(z, ids, logprobs, dtype, tail, params)
                        cells.append(f"{median:.1e} / {worst:.1e}")
                    lines.append(f"| {regime} | {k} | {p_tail:.1e} | {tail} | {name} | " + " | ".join(cells)
                                 + f" | {u_err:.1e} |")
                    print(lines[-1], flush=True)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=lambda s: [int(t) for t in s.split(",")], default=[8, 64])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    lines = run(args.k, reference.TAILS)
    command = "python -m benchmarks.topk_storage " + " ".join(argv if argv is not None else sys.argv[1:])
    body = "\n".join([
        "### Storage dtypes of the log-probabilities", "",
        f"Command: `{command.strip()}`. {ROWS} rows, V = {VOCAB}; relative error of each row's distillation term "
        "(float64 reference) from log-probabilities stored in the dtype, against float64 ones; median p_R = the "
        "teacher's tail mass outside its top k. The last column: the WTTM weight's error when p_R is summed in "
        "fp32 rather than float64, from fp32 log-probabilities.", "", *lines, ""])
    print(body)
    if not args.no_write:
        write_results(os.path.join(HERE, "RESULTS.md"), "storage", body, SECTION, INTRO)


if __name__ == "__main__":
    main()
