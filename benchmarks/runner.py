"""The sweep: cases x providers x modes, skips, and the CSV / JSON / terminal table.

For each case (N, V, dtype) the inputs are made once (rotated among ``copies`` sets when one set is
smaller than ``rotate_bytes``, by default 4x the L2, so that repeated calls do not run out of cache) and
shared by the providers, each timed in every mode. Before a provider runs on a case, its pessimistic peak
(``providers.estimate_peak_bytes``) is compared with ``mem_fraction`` of the free memory, and a combination
that cannot fit is recorded as skipped with the estimate instead of being tried; an out-of-memory error
that still happens is caught and recorded the same way. A time budget, when given, is checked before every
(case, provider) and cuts repetitions short; SIGTERM (``timeout``) stops the sweep and still writes
everything measured so far. The CSV is written row by row, so even a killed run leaves its rows.
"""
from __future__ import annotations

import csv
import gc
import json
import math
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from . import measure, providers as P
from .results_md import fixed_cost_line

CSV_FIELDS = [
    "provider", "backend", "mode", "N", "V", "dtype", "status", "median_ms", "p20_ms", "p80_ms", "reps",
    "first_call_ms", "peak_mib", "mem_method", "bytes_model", "eff_gbps", "frac_copy_bw", "copy_gbps",
    "copies", "device", "device_name", "torch", "triton", "commit", "note",
]

MIB = 1 << 20


@dataclass
class Config:
    device: str
    cases: list  # [(N, V, dtype name)] in the order they run
    providers: list = field(default_factory=lambda: list(P.DEFAULT_PROVIDERS))
    modes: list = field(default_factory=lambda: list(P.MODES))
    out: str = "out/benchmarks"
    tag: str = "bench"
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 10
    max_reps: int = 1000
    time_budget_s: Optional[float] = None
    mem_fraction: float = 0.85
    memory: bool = True
    plots: bool = True
    compile_dynamic: bool = False
    rotate_bytes: Optional[int] = None  # default: 4 x L2
    max_copies: int = 8
    copy_mib: Optional[float] = None  # copy-bandwidth buffer; default 1 GiB on CUDA, 256 MiB on CPU
    seed: int = 0
    progress: bool = True
    overhead: bool = True  # measure each provider's per-call fixed cost first (fixed_cost_us)


class _Stop(Exception):
    pass


def _on_sigterm(signum, frame):
    raise _Stop(f"signal {signum}")


def _fmt(x, spec):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def format_table(rows: list) -> str:
    """Fixed-width table of all rows, with each provider's speed-up over eager in the same (case, mode)."""
    eager = {(r["N"], r["V"], r["dtype"], r["mode"]): r["median_ms"] for r in rows
             if r["provider"] == "eager" and r["status"] == "ok"}
    head = (f"{'dtype':5} {'N':>6} {'V':>7} {'mode':4} {'provider':13} {'backend':15} {'median ms':>10} "
            f"{'p20-p80 ms':>19} {'peak MiB':>9} {'GB/s':>8} {'%copy':>6} {'x eager':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['dtype']:5} {r['N']:>6} {r['V']:>7} {r['mode']:4} {r['provider']:13} "
                         f"{r['status']}: {r['note']}")
            continue
        base = eager.get((r["N"], r["V"], r["dtype"], r["mode"]))
        speedup = base / r["median_ms"] if base else None
        spread = f"{_fmt(r['p20_ms'], '.3f')}-{_fmt(r['p80_ms'], '.3f')}"
        lines.append(
            f"{r['dtype']:5} {r['N']:>6} {r['V']:>7} {r['mode']:4} {r['provider']:13} {r['backend']:15} "
            f"{_fmt(r['median_ms'], '10.3f')} {spread:>19} {_fmt(r['peak_mib'], '9.1f')} "
            f"{_fmt(r['eff_gbps'], '8.1f')} {_fmt(None if r['frac_copy_bw'] is None else 100 * r['frac_copy_bw'], '6.1f')} "
            f"{_fmt(speedup, '7.2f')}")
    return "\n".join(lines)


def _copies(case_bytes: int, cfg: Config, device: torch.device) -> int:
    rotate = cfg.rotate_bytes if cfg.rotate_bytes is not None else 4 * measure.l2_bytes(device)
    if case_bytes >= rotate:
        return 1
    return int(max(1, min(cfg.max_copies, math.ceil(rotate / max(case_bytes, 1)))))


def _free_memory(device: torch.device, collect: bool = False) -> None:
    # A full gc.collect() costs ~0.5 s once torch.compile has filled the heap: only between cases.
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(cfg: Config) -> dict:
    """Runs the sweep of ``cfg``; writes ``<tag>.csv``, ``<tag>.json`` (and the plots) under ``cfg.out`` and
    returns the JSON document."""
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch.cuda.is_available() is False "
                         f"(torch {torch.__version__}); run with --device cpu")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # CUDA events record on the current device's stream
    t_start = time.perf_counter()
    deadline = None if cfg.time_budget_s is None else t_start + cfg.time_budget_s
    os.makedirs(cfg.out, exist_ok=True)
    csv_path = os.path.join(cfg.out, f"{cfg.tag}.csv")
    json_path = os.path.join(cfg.out, f"{cfg.tag}.json")

    if device.type == "cpu":
        measure.pin_malloc_mmap_threshold()
    env = measure.environment(device)
    notes: list = []
    if device.type == "cpu" and cfg.memory and not measure.cpu_peak_supported():
        notes.append("CPU peak memory unavailable: /proc/self/clear_refs is not writable here")

    copy_gbps, copy_bytes = measure.copy_bandwidth(
        device, None if cfg.copy_mib is None else int(cfg.copy_mib * MIB))
    env["copy_gbps"] = copy_gbps
    env["copy_buffer_mib"] = copy_bytes / MIB
    print(f"# {env['device_name']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}",
          flush=True)
    print(f"# copy bandwidth: {copy_gbps:.1f} GB/s (copy_ of {copy_bytes / MIB:.0f} MiB, read + write)",
          flush=True)

    # Resolve the providers once; one that cannot run here is noted, not repeated per row.
    resolved = []
    for name in cfg.providers:
        try:
            resolved.append(P.get_provider(name, device, compile_dynamic=cfg.compile_dynamic))
        except P.Unavailable as exc:
            notes.append(f"provider {name} skipped: {exc}")
            print(f"# provider {name} skipped: {exc}", flush=True)
    # fused_inplace overwrites z with its gradient: run it after everything else on each case.
    resolved.sort(key=lambda p: p.destroys_input)
    if cfg.overhead:
        env["fixed_cost_us"] = fixed_cost_us(resolved, device, cfg)
        env["fixed_cost_case"] = list(FIXED_COST_CASE)
        print(f"# {fixed_cost_line(env)}", flush=True)

    rows: list = []
    old_handler = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    csv_file = open(csv_path, "w", newline="")
    writer = csv.DictWriter(csv_file, fieldnames=CSV_FIELDS)
    writer.writeheader()
    csv_file.flush()

    def emit(row: dict) -> None:
        rows.append(row)
        writer.writerow({k: row.get(k) for k in CSV_FIELDS})
        csv_file.flush()

    common = {k: env[k] for k in ("device", "device_name", "torch", "triton", "commit")}
    bar = _progress(len(cfg.cases) * len(resolved), cfg.progress)
    stopped = None
    try:
        for n, v, dtype_name in cfg.cases:
            dtype = P.DTYPES[dtype_name]
            one_set = P.input_bytes(n, v, dtype)
            copies = _copies(one_set, cfg, device)
            base_row = dict(common, N=n, V=v, dtype=dtype_name, copies=copies, copy_gbps=copy_gbps)
            case = None
            for prov in resolved:
                bar.set_description(f"{dtype_name} N={n} V={v} {prov.name}")
                row0 = dict(base_row, provider=prov.name, backend=prov.backend)

                def skip_all(status, note):
                    for mode in cfg.modes:
                        emit(dict(row0, mode=mode, status=status, note=note))

                if deadline is not None and time.perf_counter() > deadline:
                    skip_all("skipped", f"time budget of {cfg.time_budget_s:.0f} s spent")
                    bar.update(1)
                    continue
                _free_memory(device)
                need = P.estimate_peak_bytes(prov, n, v, dtype, copies)
                have = measure.available_bytes(device) + (case.input_bytes if case is not None else 0)
                if need > cfg.mem_fraction * have:
                    skip_all("skipped", f"estimated {need / 2**30:.1f} GiB > {cfg.mem_fraction:.2f} x "
                                        f"{have / 2**30:.1f} GiB free")
                    bar.update(1)
                    continue
                try:
                    if case is None:
                        case = P.make_case(n, v, dtype, device, copies=copies, seed=cfg.seed)
                except torch.OutOfMemoryError:
                    case = None
                    _free_memory(device)
                    skip_all("skipped", "out of memory making the inputs")
                    bar.update(1)
                    continue
                for mode in cfg.modes:
                    row = dict(row0, mode=mode)
                    try:
                        row.update(_measure_one(prov, case, mode, device, cfg, deadline, copy_gbps))
                        row["status"] = "ok"
                    except torch.OutOfMemoryError as exc:
                        row.update(status="skipped", note=f"out of memory: {str(exc).splitlines()[0][:160]}")
                        _free_memory(device)
                    except (_Stop, KeyboardInterrupt):
                        raise
                    except Exception as exc:  # noqa: BLE001  (record, go on with the sweep)
                        traceback.print_exc(file=sys.stderr)
                        row.update(status="error", note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                                   if str(exc) else type(exc).__name__)
                    emit(row)
                    if row["status"] == "ok":
                        bar.write(_progress_line(row))
                bar.update(1)
            del case
            _free_memory(device, collect=True)
    except (_Stop, KeyboardInterrupt) as exc:
        stopped = f"stopped early ({exc or 'interrupted'}); rows measured before that are kept"
        notes.append(stopped)
    finally:
        bar.close()
        csv_file.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)

    env["wall_s"] = time.perf_counter() - t_start
    env["loadavg_1m_at_end"] = measure._loadavg()
    if device.type == "cpu":
        busy = max(env["loadavg_1m_at_start"], env["loadavg_1m_at_end"])
        if busy > 0.5 * (os.cpu_count() or 1) + 0.5:
            notes.append(f"CPU load average reached {busy:.1f} on {os.cpu_count()} cores during the run: "
                         "other processes competed for the cores, so these CPU timings are noisy")
    doc = {"meta": env, "config": _config_dict(cfg), "notes": notes, "rows": rows}
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    print(format_table(rows), flush=True)
    for note in notes:
        print(f"# {note}", flush=True)
    if cfg.plots:
        try:
            from . import report

            paths = report.plot(rows, cfg.out, cfg.tag, env)
            print("# plots: " + ", ".join(paths), flush=True)
        except Exception as exc:  # noqa: BLE001  (plots are optional; the numbers are written already)
            print(f"# plots failed: {type(exc).__name__}: {exc}", flush=True)
    print(f"# wrote {csv_path} and {json_path}; wall time {env['wall_s']:.1f} s", flush=True)
    return doc


FIXED_COST_CASE = (2, 8)  # (N, V): a problem whose arithmetic takes well under a microsecond


def fixed_cost_us(providers: list, device: torch.device, cfg: Config) -> dict:
    """Each provider's per-call fixed cost in microseconds: the median time of one forward + backward
    (``full``) on ``FIXED_COST_CASE``, where nothing is left but the cost that every call pays whatever its
    size (Python dispatch and argument checks, small tensor operations, kernel launches, autograd)."""
    n, v = FIXED_COST_CASE
    case = P.make_case(n, v, torch.float32, device, seed=cfg.seed)
    costs = {}
    for prov in providers:
        prepare, run_fn = P.mode_fns(prov, case, "full")
        timing = measure.time_fn(prepare, run_fn, device, warmup_ms=max(cfg.warmup_ms, 20.0),
                                 rep_ms=max(cfg.rep_ms, 50.0), min_reps=max(cfg.min_reps, 50), max_reps=10000)
        costs[prov.name] = timing.median_ms * 1e3
    return costs


def _measure_one(prov, case, mode, device, cfg, deadline, copy_gbps) -> dict:
    prepare, run_fn = P.mode_fns(prov, case, mode)
    timing = measure.time_fn(prepare, run_fn, device, copies=case.copies, warmup_ms=cfg.warmup_ms,
                             rep_ms=cfg.rep_ms, min_reps=cfg.min_reps, max_reps=cfg.max_reps, deadline=deadline)
    peak, method = (math.nan, "off")
    if cfg.memory:
        peak, method = measure.peak_extra_bytes(prepare, run_fn, device)
    nbytes = P.bytes_moved(mode, case.n, case.v, case.dtype)
    eff = nbytes / (timing.median_ms * 1e-3) / 1e9
    return {
        "median_ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms, "reps": timing.reps,
        "first_call_ms": timing.first_call_ms, "peak_mib": peak / MIB if not math.isnan(peak) else math.nan,
        "mem_method": method, "bytes_model": nbytes, "eff_gbps": eff, "frac_copy_bw": eff / copy_gbps,
        "note": "",
    }


def _progress_line(r: dict) -> str:
    return (f"  {r['dtype']} N={r['N']} V={r['V']} {r['provider']:13} {r['mode']:4} "
            f"{r['median_ms']:9.3f} ms  peak {_fmt(r['peak_mib'], '.1f')} MiB  "
            f"{100 * r['frac_copy_bw']:5.1f}% of copy bw")


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm

        return tqdm(total=total, disable=not enabled, file=sys.stderr, dynamic_ncols=True, leave=False)
    except ImportError:
        return _NoBar()


class _NoBar:
    def set_description(self, *a, **k):
        pass

    def update(self, *a, **k):
        pass

    def write(self, s):
        print(s, flush=True)

    def close(self):
        pass


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _config_dict(cfg: Config) -> dict:
    d = asdict(cfg)
    d["cases"] = [list(c) for c in cfg.cases]
    return d
