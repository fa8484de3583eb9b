"""Vocabulary-parallel loss + gradient on 1, 2, 4 processes, against gathering the logits first.

    python -m benchmarks.tp_bench                          # CPU, gloo, 1/2/4 processes, V = 32000
    python -m benchmarks.tp_bench --device cuda --worlds 2,4,8   # NCCL, one GPU per process (not yet run)
    python -m benchmarks.tp_bench --teacher topk --k 64    # a sparse teacher: its top-k on every rank

Each of W spawned processes holds a contiguous V/W slice of the columns of both (N, V) fp32 logits and the
whole target. One step = forward + backward of the WTTM loss (reduction "mean"), giving this rank its
slice of the gradient, by:

* ``vocab-parallel``: ``fused_wttm_loss(z_slice, v_slice, y, process_group=group)``: the agreement exchange,
  the all_gather of the per-row partial sums, the merge, the second pass and the KL all-reduce.
* ``gather logits``: what users do without it: all_gather both slices into the (N, V) logits on every rank,
  ``fused_wttm_loss`` on them, and keep the slice of the gradient.

With W = 1 the vocabulary-parallel call runs the one-process kernels (a group of one holds whole rows).

``--teacher topk``: the teacher's top-k ids (global) and log-probabilities on every rank instead of its logits,
``fused_wttm_loss_topk``; ``vocab-parallel`` runs the top-k kernels' partial sums and merge, and
``vocab-parallel torch`` the same call with ``backend="torch"``: the reference's arithmetic per rank with autograd
(what every backend ran before the top-k kernels had partial sums), measured in the same run.

Time: per step, every rank's ``perf_counter`` time after a barrier; the step's time is the slowest rank's;
the table gives the median over ``--reps`` steps after two warm-up steps. ``--threads`` torch threads per
process (default 1: on a 2-core machine 4 processes already oversubscribe it).

Bytes each rank sends per step (ring collectives, as gloo and NCCL run them at these sizes; analytic, not
counted): vocabulary-parallel (W - 1) * 36 N (the partials' all_gather: 9 fp32 per row) + 2 (W - 1) / W * 4 N
(the KL's all-reduce) + (W - 1) * 96 (the agreement: 12 int64); gathering the logits (W - 1) * 2 * N * V/W * 4.

Also timed: the merge's collective alone, the all_gather of the (9, N) partials against the two all-reduces
that would replace it (max of the 5 maxima rows, then sum of the 4 rescaled sums rows).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ttm_kernels import fused_wttm_loss, fused_wttm_loss_topk
from ttm_kernels._stats import NUM_PARTIAL
from ttm_kernels.distributed import _all_gather_single

from .measure import environment

PARTIAL_MAXIMA = 5  # MAX_S, MAX_T, MAX_V, MAX_Z, TARGET_LOGIT: the rows two all-reduces would reduce by max


def _steps(fn, reps, device):
    """Median over ``reps`` steps (after two warm-up steps) of the slowest rank's time, in ms."""
    times = []
    for i in range(reps + 2):
        dist.barrier()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i >= 2:
            times.append(elapsed.item() * 1e3)
    return statistics.median(times)


def _worker(rank, world, args, store, out):
    torch.set_num_threads(args.threads)
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    n, vocab = args.N, args.V
    width = vocab // world
    # Each rank draws only its own slice (the full logits never exist on one rank).
    gen = torch.Generator().manual_seed(rank)
    z = (torch.randn(n, width, generator=gen) * 10).to(device)
    v = (torch.randn(n, width, generator=gen) * 10).to(device)
    target = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(1)).to(device)
    group = dist.group.WORLD
    # A sparse teacher: the same top-k on every rank (k distinct ids per row, 0.9 of the mass).
    shared = torch.Generator().manual_seed(2)
    ids = torch.rand(n, vocab, generator=shared).topk(args.k, -1).indices.to(device)
    logprobs = (torch.log_softmax(torch.randn(n, args.k, generator=shared) * 3, -1) + math.log(0.9)).to(device)

    def loss(student, teacher, **kwargs):
        if args.teacher == "topk":
            return fused_wttm_loss_topk(student, ids, logprobs, target, **kwargs)
        return fused_wttm_loss(student, teacher, target, **kwargs)

    def vocab_parallel(**kwargs):
        student = z.detach().requires_grad_()
        loss(student, v, process_group=group, **kwargs).backward()
        return student.grad

    def gather_logits():
        full_z = torch.empty(world * n, width, device=device)
        _all_gather_single(full_z, z, group=group)
        student = full_z.view(world, n, width).permute(1, 0, 2).reshape(n, vocab).requires_grad_()
        teacher = None
        if args.teacher == "logits":
            full_v = torch.empty_like(full_z)
            _all_gather_single(full_v, v, group=group)
            teacher = full_v.view(world, n, width).permute(1, 0, 2).reshape(n, vocab)
        loss(student, teacher).backward()
        return student.grad[:, rank * width:(rank + 1) * width]

    partials = torch.randn(NUM_PARTIAL, n, device=device)
    gathered = torch.empty(world * NUM_PARTIAL, n, device=device)

    def all_gather_partials():
        _all_gather_single(gathered, partials, group=group)

    def two_all_reduces():
        maxima, sums = partials[:PARTIAL_MAXIMA].clone(), partials[PARTIAL_MAXIMA:].clone()
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(sums, group=group)

    providers = {"vocab-parallel": vocab_parallel, "gather logits": gather_logits}
    if args.teacher == "topk" and world > 1:
        providers["vocab-parallel torch"] = lambda: vocab_parallel(backend="torch")
    result = {name: _steps(fn, args.reps, device) for name, fn in providers.items()}
    result["all_gather partials"] = _steps(all_gather_partials, args.reps * 4, device)
    result["two all-reduces"] = _steps(two_all_reduces, args.reps * 4, device)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def sent_bytes(world, n, vocab, k=None):
    """(vocabulary-parallel, gathered logits) bytes each rank sends per step, ring collectives; ``k``: a top-k
    teacher's (6 + k partials per row, no KL all-reduce; only the student's logits to gather)."""
    agreement = (world - 1) * 12 * 8
    if k is not None:
        return (world - 1) * 4 * (6 + k) * n + agreement, (world - 1) * n * (vocab // world) * 4
    ours = (world - 1) * 4 * NUM_PARTIAL * n + 2 * (world - 1) / world * 4 * n + agreement
    gather = (world - 1) * 2 * n * (vocab // world) * 4
    return ours, gather


def _size(b):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--worlds", default="1,2,4", help="process counts, comma-separated")
    parser.add_argument("--N", type=int, default=1024, help="rows (tokens)")
    parser.add_argument("--V", type=int, default=32000, help="vocabulary (divisible by every process count)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--teacher", choices=("logits", "topk"), default="logits")
    parser.add_argument("--k", type=int, default=64, help="the top-k teacher's ids per row (--teacher topk)")
    args = parser.parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",")]
    env = environment(torch.device(args.device))
    print(f"{env['device_name']}, {env['cpu_count']} CPUs, load average {env['loadavg_1m_at_start']} at start; "
          f"torch {env['torch']}, {env['date_utc']} UTC; N={args.N}, V={args.V}, fp32, WTTM mean, "
          f"{args.threads} thread(s) per process, {args.reps} timed steps, teacher: "
          + ("logits" if args.teacher == "logits" else f"top-{args.k}"))
    rows = []
    for world in worlds:
        with tempfile.TemporaryDirectory() as folder:
            out = os.path.join(folder, "result.json")
            mp.start_processes(_worker, args=(world, args, os.path.join(folder, "store"), out), nprocs=world,
                               start_method="spawn")
            with open(out) as f:
                result = json.load(f)
        ours, gather = sent_bytes(world, args.N, args.V, args.k if args.teacher == "topk" else None)
        rows.append((world, result, ours, gather))
    print("\n| processes | V per rank | vocab-parallel ms | gather logits ms | gather / vocab-parallel | "
          "sent per rank: vocab-parallel | sent per rank: gather logits |")
    print("|---|---|---|---|---|---|---|")
    for world, result, ours, gather in rows:
        print(f"| {world} | {args.V // world} | {result['vocab-parallel']:.1f} | {result['gather logits']:.1f} | "
              f"{result['gather logits'] / result['vocab-parallel']:.2f} | {_size(ours)} | {_size(gather)} |")
    if args.teacher == "topk":
        print("\n| processes | vocab-parallel ms | vocab-parallel torch ms | torch / vocab-parallel |")
        print("|---|---|---|---|")
        for world, result, _, _ in rows:
            if "vocab-parallel torch" in result:
                print(f"| {world} | {result['vocab-parallel']:.1f} | {result['vocab-parallel torch']:.1f} | "
                      f"{result['vocab-parallel torch'] / result['vocab-parallel']:.2f} |")
    print(f"\nThe merge's collective alone (N={args.N}): ms per call")
    print("\n| processes | all_gather of the (9, N) partials | two all-reduces (max, sum) |")
    print("|---|---|---|")
    for world, result, _, _ in rows:
        print(f"| {world} | {result['all_gather partials']:.3f} | {result['two all-reduces']:.3f} |")


if __name__ == "__main__":
    main()
