"""``python -m benchmarks``: time forward, backward and forward+backward of the WTTM loss per provider.

Examples::

    python -m benchmarks --quick                          # small CPU sweep, under 2 minutes on 2 cores
    python -m benchmarks --device cuda --out out/h100     # the full sweep on a GPU
    python -m benchmarks --preset gpu-check --device cuda --time-budget 240
    python -m benchmarks --V 32000,128256 --N 4096 --dtypes bf16 --providers fused,eager --modes full

Cases come from a preset (``--preset``, or ``--quick`` for ``quick``), unless any of ``--N``, ``--V`` or
``--dtypes`` is given: then their cartesian product (with the preset's values for the others). Outputs
under ``--out``: ``<tag>.csv``, ``<tag>.json``, ``<tag>_time.png``, ``<tag>_memory.png``, and the table on
stdout. See ``benchmarks.measure`` for what is measured and ``benchmarks.providers`` for the bytes model.
"""
from __future__ import annotations

import argparse
import itertools

import torch

from . import providers as P
from .runner import Config, run

SWEEP_V = [100, 1000, 32000, 128256, 262144]
# Presets: (N values, V values, dtypes) for a cartesian product, or an explicit ordered case list.
PRESETS = {
    "default-cuda": dict(N=[1024, 4096, 16384], V=SWEEP_V, dtypes=["fp32", "bf16"]),
    "default-cpu": dict(N=[64, 512], V=SWEEP_V, dtypes=["fp32", "bf16"]),
    "quick": dict(N=[128], V=[100, 1000, 32000], dtypes=["fp32", "bf16"]),
    # The GPU machine's check (benchmarks/gpu_check.sh), most important case first, so that a time budget
    # that runs out drops the least important ones.
    "gpu-check": dict(cases=[(4096, 32000, "bf16"), (4096, 128256, "bf16"), (4096, 262144, "bf16"),
                             (64, 262144, "bf16"), (4096, 32000, "fp32"), (16384, 32000, "bf16")]),
}
QUICK_TIMING = dict(warmup_ms=5.0, rep_ms=30.0, min_reps=5, max_reps=50)


def _ints(text: str) -> list:
    return [int(x) for x in text.split(",") if x]


def _names(choices):
    def parse(text: str) -> list:
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in names if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(choices)}")
        return names
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="the small 'quick' preset with short timing windows (CPU unless --device says otherwise)")
    ap.add_argument("--preset", choices=["default", "quick", "gpu-check"], default=None,
                    help="case list (default: 'default', the full sweep for the device)")
    ap.add_argument("--device", default=None, help="cpu or cuda[:k] (default: cuda when available, else cpu)")
    ap.add_argument("--out", default="out/benchmarks", help="output folder (default out/benchmarks)")
    ap.add_argument("--tag", default=None, help="file-name prefix (default: '<preset>-<device type>')")
    ap.add_argument("--providers", type=_names(P.PROVIDERS), default=list(P.DEFAULT_PROVIDERS),
                    help=f"comma list from {','.join(P.PROVIDERS)} (default {','.join(P.DEFAULT_PROVIDERS)})")
    ap.add_argument("--modes", type=_names(P.MODES), default=list(P.MODES), help="comma list of fwd,bwd,full")
    ap.add_argument("--N", type=_ints, default=None, help="row counts, comma list")
    ap.add_argument("--V", type=_ints, default=None, help="vocabulary sizes, comma list")
    ap.add_argument("--dtypes", type=_names(P.DTYPES), default=None, help="comma list of fp32,bf16,fp16")
    ap.add_argument("--warmup-ms", type=float, default=None, help="warm-up time per measurement (default 25)")
    ap.add_argument("--rep-ms", type=float, default=None, help="timed window per measurement (default 100)")
    ap.add_argument("--min-reps", type=int, default=None, help="fewest timed calls (default 10)")
    ap.add_argument("--max-reps", type=int, default=None, help="most timed calls (default 1000)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds for the whole sweep; cases left when it is spent are recorded as skipped")
    ap.add_argument("--mem-fraction", type=float, default=0.85,
                    help="skip a combination whose estimated peak exceeds this fraction of free memory")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    ap.add_argument("--no-overhead", action="store_true",
                    help="skip the per-call fixed-cost measurement (forward + backward on a 2 x 8 problem)")
    ap.add_argument("--no-plots", action="store_true", help="write no PNG")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    ap.add_argument("--compile-dynamic", action="store_true",
                    help="torch.compile(dynamic=True) (default: static shapes, one compilation per case)")
    ap.add_argument("--rotate-mib", type=float, default=None,
                    help="rotate input copies until they span this many MiB (default 4 x L2)")
    ap.add_argument("--copy-mib", type=float, default=None,
                    help="buffer of the copy-bandwidth measurement (default 1024 on CUDA, 256 on CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def config_from_args(args) -> Config:
    preset = "quick" if args.quick else (args.preset or "default")
    if args.device is None:
        args.device = "cpu" if preset == "quick" or not torch.cuda.is_available() else "cuda"
    device = torch.device(args.device)
    key = f"default-{device.type}" if preset == "default" else preset
    spec = PRESETS[key]
    if "cases" in spec and args.N is None and args.V is None and args.dtypes is None:
        cases = list(spec["cases"])
    else:
        base = spec if "cases" not in spec else PRESETS[f"default-{device.type}"]
        ns = args.N or base["N"]
        vs = args.V or base["V"]
        dts = args.dtypes or base["dtypes"]
        cases = [(n, v, d) for d, n, v in itertools.product(dts, ns, vs)]
    timing = dict(QUICK_TIMING) if preset == "quick" else {}
    for name in ("warmup_ms", "rep_ms", "min_reps", "max_reps"):
        if getattr(args, name) is not None:
            timing[name] = getattr(args, name)
    return Config(
        device=str(device), cases=cases, providers=args.providers, modes=args.modes, out=args.out,
        tag=args.tag or f"{preset}-{device.type}", time_budget_s=args.time_budget, mem_fraction=args.mem_fraction,
        memory=not args.no_memory, overhead=not args.no_overhead, plots=not args.no_plots,
        compile_dynamic=args.compile_dynamic,
        rotate_bytes=None if args.rotate_mib is None else int(args.rotate_mib * (1 << 20)), seed=args.seed,
        copy_mib=args.copy_mib, progress=not args.no_progress, **timing)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    doc = run(cfg)
    ok = sum(r["status"] == "ok" for r in doc["rows"])
    errors = sum(r["status"] == "error" for r in doc["rows"])
    # Exit 0 when anything was measured and nothing failed; 1 on errors; 2 when nothing ran at all.
    if errors:
        return 1
    return 0 if ok else 2
