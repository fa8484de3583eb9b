"""Timers, peak memory, copy bandwidth and the environment record.

Timing (``time_fn``)
    CUDA: one pair of CUDA events around every call (the ``triton.testing.do_bench`` scheme, without its
    L2 flush: the runner rotates among several input copies instead), after warm-up; the host never waits
    between calls except where the provider itself syncs. CPU: ``time.perf_counter`` around every call.
    Both: the result (the loss, or the gradient) is released only after the timer stops: freeing a
    gradient (a munmap of N*V*b bytes on CPU) is the caller's business, not the op's. Allocating and first
    touching it is the op's, and is timed.
    Both: the first call (compilation, autotuning, allocation) is timed separately as ``first_call_ms``;
    then warm-up calls until ``warmup_ms`` has passed (at least one more); then
    ``clamp(rep_ms / estimate, min_reps, max_reps)`` timed calls. Reported: median, p20 and p80.

Peak memory (``peak_extra_bytes``), always the EXTRA peak: the most bytes held at any moment during one
call beyond what was held when it started (the inputs and, for ``bwd``, the graph the untimed forward
saved). One separate untimed call after the timing, so compilation is not counted.
    CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
    ``memory_allocated()`` at the start: bytes of live tensors in PyTorch's caching allocator (cached but
    free blocks do not count; Triton/cuBLAS workspaces allocated outside it do not either).
    CPU (``cpu_rss``): the process's resident set. glibc's mmap threshold is pinned at 64 KiB
    (``pin_malloc_mmap_threshold``, once at start-up) so that every freed buffer of 64 KiB or more goes
    back to the kernel and leaves the RSS, instead of being kept in the heap where a later call would
    reuse it unseen; then ``/proc/self/clear_refs`` is written "5", which resets the kernel's high-water
    mark (VmHWM) to the current RSS, and the extra peak is VmHWM after the call minus VmRSS before it. It
    counts every page the call touched for the first time (tensors, but also allocator and thread-pool
    overheads), with page granularity; untouched allocations (``torch.empty`` never written) do not count.
    Where /proc/self/clear_refs cannot be written, the CPU peak is reported as missing (NaN).

Copy bandwidth (``copy_bandwidth``): ``dst.copy_(src)`` of a large buffer (1 GiB on CUDA, 256 MiB on
CPU, both far beyond any cache), bytes read + written (2 x size) over the median time. The reference
for the effective bandwidths: a fraction of 1.0 means the provider moved its ideal bytes as fast as the
device copies memory.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    first_call_ms: float


def quantile(values, q: float) -> float:
    """Linear-interpolated quantile (as numpy's default), q in [0, 1]."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(prepare: Callable[[int], object], run: Callable[[int, object], object], device: torch.device, *,
            copies: int = 1, warmup_ms: float = 25.0, rep_ms: float = 100.0, min_reps: int = 10,
            max_reps: int = 1000, deadline: Optional[float] = None) -> Timing:
    """Times ``run(i, prepare(i))`` over input copies ``i = k % copies``; only ``run`` is timed.

    ``deadline`` (a ``time.perf_counter()`` value) cuts the repetitions short, never below 3.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"

    def one_wall(k: int) -> float:
        state = prepare(k % copies)
        _sync(device)
        t0 = time.perf_counter()
        out = run(k % copies, state)
        _sync(device)
        elapsed = (time.perf_counter() - t0) * 1e3
        del out  # freeing the result (a gradient munmap on CPU) is not the op's time
        return elapsed

    first = one_wall(0)
    # Warm-up: until warmup_ms has passed, at least one call after the first.
    k, spent, est = 1, 0.0, []
    while True:
        est.append(one_wall(k))
        spent += est[-1]
        k += 1
        if spent >= warmup_ms or (deadline is not None and time.perf_counter() > deadline):
            break
    estimate = max(statistics.median(est[-5:]), 1e-3)
    reps = int(min(max(math.ceil(rep_ms / estimate), min_reps), max_reps))
    if deadline is not None:
        left_ms = (deadline - time.perf_counter()) * 1e3
        reps = max(3, min(reps, int(left_ms / (2 * estimate)) if left_ms > 0 else 3))

    times = []
    if cuda:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for r in range(reps):
            i = (k + r) % copies
            state = prepare(i)
            starts[r].record()
            out = run(i, state)
            ends[r].record()
            del out, state
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for r in range(reps):
            i = (k + r) % copies
            state = prepare(i)
            t0 = time.perf_counter()
            out = run(i, state)
            times.append((time.perf_counter() - t0) * 1e3)
            del out, state
    return Timing(statistics.median(times), quantile(times, 0.2), quantile(times, 0.8), reps, first)


# ----------------------------------------------------------------------------------------------------------
# CPU memory

_PINNED = False


def pin_malloc_mmap_threshold(threshold: int = 64 * 1024) -> bool:
    """mallopt(M_MMAP_THRESHOLD, threshold): freed blocks >= threshold return to the kernel (glibc only)."""
    global _PINNED
    if _PINNED:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_MMAP_THRESHOLD = -3
        _PINNED = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        _PINNED = False
    return _PINNED


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_supported() -> bool:
    return _status_kib("VmHWM") is not None and _reset_hwm()


def peak_extra_bytes(prepare, run, device: torch.device) -> tuple[float, str]:
    """(extra peak bytes of one call of ``run`` after ``prepare(0)``, method name); see the module doc."""
    device = torch.device(device)
    state = prepare(0)
    # (No gc.collect() here: reference counting frees the tensors, and after torch.compile a full
    # collection takes ~0.5 s.)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = run(0, state)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out, state
        return float(peak), "cuda_max_allocated"
    base = _status_kib("VmRSS")
    if base is None or not _reset_hwm():
        out = run(0, state)
        del out, state
        return math.nan, "unavailable"
    out = run(0, state)
    hwm = _status_kib("VmHWM")
    del out, state
    return float(max(hwm - base, 0) * 1024), "cpu_rss"


# ----------------------------------------------------------------------------------------------------------
# Copy bandwidth


def copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, reps: int = 10) -> tuple[float, int]:
    """(GB/s of dst.copy_(src), bytes per buffer): 2 * nbytes / median time; GB = 1e9 bytes."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            nbytes = min(nbytes, max(free // 8, 1 << 20))
        else:
            avail = available_bytes(device)
            nbytes = min(nbytes, max(avail // 8, 1 << 20))
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first

    def prepare(i):
        return None

    def run(i, state):
        dst.copy_(src)

    timing = time_fn(prepare, run, device, warmup_ms=10, rep_ms=200, min_reps=reps, max_reps=50)
    src = dst = None  # free both buffers before emptying the cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * n * 4 / (timing.median_ms * 1e-3) / 1e9, n * 4


def available_bytes(device: torch.device) -> int:
    """Free memory a benchmark may use: CUDA's free bytes, or the kernel's MemAvailable on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def l2_bytes(device: torch.device) -> int:
    """The last-level cache the input rotation must defeat (CUDA L2; 64 MiB assumed on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 50 << 20) or (50 << 20))
    return 64 << 20


# ----------------------------------------------------------------------------------------------------------
# Environment


def git_commit() -> str:
    """``git rev-parse --short HEAD`` of the repository, "+dirty" when tracked code (ttm_kernels/, csrc/,
    setup.py, benchmarks/*.py) differs from it; $TTM_GIT_COMMIT, or "unknown", where there is no git checkout."""
    env = os.environ.get("TTM_GIT_COMMIT")
    if env:
        return env
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        if not commit:
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "ttm_kernels", "csrc", "setup.py",
                                "benchmarks/*.py"],
                               cwd=REPO, capture_output=True, timeout=10).returncode
        return commit + ("+dirty" if dirty == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def _loadavg() -> float:
    """The 1-minute load average: CPU timings taken while other processes compete for the cores (load
    near or above the core count) are unreliable, so every run records it."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = "none"
    return {
        "device": torch.device(device).type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1m_at_start": _loadavg(),
        "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks", *sys.argv[1:]]),
    }
