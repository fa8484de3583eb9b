"""Fused linear WTTM loss against materialised logits: forward+backward time and peak extra memory.

    python -m benchmarks.linear_bench                 # CUDA when present, else the CPU sweep
    python -m benchmarks.linear_bench --device cpu --no-write

Providers, each one full training step of the LM heads (student hidden states and weight get gradients):

* ``fused``: ``fused_linear_wttm_loss(h_s, W_s, h_t, W_t, y)``, default chunk size (``fused[c=...]`` with
  ``--chunks``).
* ``logits`` (a): ``z = h_s @ W_s.T``, ``v = h_t @ W_t.T`` under no_grad, then ``fused_wttm_loss(z, v, y)``.
* ``eager`` (b): the same logits, then ``reference.paper_wttm_loss(z, v, y)`` (the paper's code).

Time: median of ``--reps`` steps after a warm-up step (CUDA events on CUDA, perf_counter on CPU).
Peak extra memory: the most bytes held during one step beyond what was held before it (inputs and weights
excluded; the gradients the step produces included).
    CUDA: ``max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus ``memory_allocated()`` before:
    live tensors in PyTorch's caching allocator (cuBLAS/Triton workspaces outside it are not counted).
    CPU: one subprocess per (provider, N) with glibc's mmap threshold pinned at 64 KiB
    (``MALLOC_MMAP_THRESHOLD_``), so freed buffers leave the resident set; after the warm-up step,
    ``/proc/self/clear_refs`` is written "5" (VmHWM reset to the current RSS), and the figure is VmHWM after
    one step minus VmRSS before it: every page the step touched, tensors and allocator overheads alike.

Writes a PNG of memory against tokens (``benchmarks/linear_memory_<device>.png``) and the table into
``benchmarks/RESULTS.md`` under "## Fused linear loss (issue 6)", replacing only this device's subsection.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

from ttm_kernels import fused_linear_wttm_loss, fused_linear_wttm_loss_topk, fused_wttm_loss, reference
from ttm_kernels._ops import resolve_backend

HERE = os.path.dirname(os.path.abspath(__file__))
SECTION = "## Fused linear loss (issue 6)"
MIB = 1 << 20
GAMMA, BETA = 0.2, 1.0
SHAPES = {  # device: (tokens, hidden, vocab, dtype)
    "cuda": ([4096, 16384], 4096, 128256, torch.bfloat16),
    "cpu": ([256, 512, 1024, 2048, 4096, 8192], 256, 8192, torch.bfloat16),
}


def make_inputs(n, hidden, vocab, dtype, device, seed=0):
    """Logits of standard deviation about 4, like an LM head's."""
    gen = torch.Generator(device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, device=device) * scale).to(dtype)

    return {
        "h_s": randn(n, hidden).requires_grad_(),
        "w_s": randn(vocab, hidden, scale=4 / hidden**0.5).requires_grad_(),
        "h_t": randn(n, hidden),
        "w_t": randn(vocab, hidden, scale=4 / hidden**0.5),
        "y": torch.randint(0, vocab, (n,), generator=gen, device=device),
    }


def teacher_topk(x, k, rows=1024):
    """The teacher's top-k ids (int32) and log-probabilities (fp32) of x's teacher, a store's content; the
    teacher itself is dropped from x: a sparse-teacher run holds none."""
    h_t, w_t = x.pop("h_t"), x.pop("w_t")
    ids, logprobs = [], []
    with torch.no_grad():
        for start in range(0, h_t.shape[0], rows):
            top = torch.log_softmax((h_t[start:start + rows] @ w_t.T).float(), -1).topk(k, -1)
            ids.append(top.indices.to(torch.int32))
            logprobs.append(top.values)
    return torch.cat(ids), torch.cat(logprobs)


def step_fn(provider, x):
    """One forward+backward of ``provider``; gradients land in x["h_s"].grad and x["w_s"].grad. ``topk[k=K]``:
    ``fused_linear_wttm_loss_topk`` from the teacher's top K (benchmarks/topk_bench.py)."""
    if provider.startswith("topk"):
        ids, logprobs = teacher_topk(x, int(provider[len("topk[k="):-1]))

        def step():
            fused_linear_wttm_loss_topk(x["h_s"], x["w_s"], ids, logprobs, x["y"], gamma=GAMMA, beta=BETA).backward()
        return step
    if provider.startswith("fused"):
        chunk = int(provider[len("fused[c="):-1]) if "[" in provider else None

        def step():
            fused_linear_wttm_loss(x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["y"], gamma=GAMMA, beta=BETA,
                                   chunk_size=chunk).backward()
        return step

    def step():
        z = x["h_s"] @ x["w_s"].T
        with torch.no_grad():
            v = x["h_t"] @ x["w_t"].T
        if provider == "logits":
            loss = fused_wttm_loss(z, v, x["y"], gamma=GAMMA, beta=BETA)
        else:
            loss = reference.paper_wttm_loss(z, v, x["y"], gamma=GAMMA, beta=BETA)
        loss.backward()
    return step


def clear_grads(x):
    x["h_s"].grad = x["w_s"].grad = None


def measure_cuda(provider, n, hidden, vocab, dtype, reps):
    x = make_inputs(n, hidden, vocab, dtype, "cuda")
    step = step_fn(provider, x)
    try:
        step()  # warm-up: compilation, cuBLAS handles
        clear_grads(x)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        times = []
        for _ in range(reps):
            clear_grads(x)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return {"ms": statistics.median(times), "peak_mib": peak / MIB}
    except torch.cuda.OutOfMemoryError:
        return {"ms": float("nan"), "peak_mib": float("nan"), "note": "OOM"}
    finally:
        del x, step
        torch.cuda.empty_cache()


def _proc_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def cpu_worker(provider, n, hidden, vocab, dtype, reps):
    """Runs in its own process (see the module docstring); prints one JSON line."""
    x = make_inputs(n, hidden, vocab, dtype, "cpu")
    step = step_fn(provider, x)
    step()
    clear_grads(x)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss = _proc_status_kib("VmRSS")
    step()
    peak_kib = _proc_status_kib("VmHWM") - rss
    times = []
    for _ in range(reps):
        clear_grads(x)
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    print(json.dumps({"ms": statistics.median(times), "peak_mib": peak_kib / 1024}))


def measure_cpu(provider, n, hidden, vocab, dtype, reps):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", "benchmarks.linear_bench", "--worker", provider, str(n), str(hidden), str(vocab),
           str(dtype).removeprefix("torch."), str(reps)]
    out = subprocess.run(cmd, env=env, cwd=os.path.dirname(HERE), capture_output=True, text=True)
    if out.returncode != 0:
        return {"ms": float("nan"), "peak_mib": float("nan"), "note": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine(device):
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                    platform.processor())
        name += f", {os.cpu_count()} cores, 1-min load average {os.getloadavg()[0]:.1f} at the end"
    import triton
    backend = resolve_backend("auto", torch.device(device))
    return (f"{name}; Python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}; "
            f"backend='auto' ran {backend!r}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


def render(device, results, tokens, hidden, vocab, dtype, command):
    providers = list(results)
    lines = [f"### {device.upper()}", "", f"![peak extra memory against tokens](linear_memory_{device}.png)", "",
             f"{machine(device)}. Command: `{command}`. H={hidden}, V={vocab}, {str(dtype).removeprefix('torch.')}, "
             "target given, nothing ignored; time = median forward+backward, memory = peak extra (see the "
             "script's docstring for what is measured).", "",
             "| N | " + " | ".join(f"{p} ms" for p in providers) + " | "
             + " | ".join(f"{p} MiB" for p in providers) + " |",
             "|---" * (1 + 2 * len(providers)) + "|"]
    for i, n in enumerate(tokens):
        cells = ([f"{results[p][i]['ms']:.1f}" for p in providers]
                 + [f"{results[p][i]['peak_mib']:.0f}" for p in providers])
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    notes = [f"{p} at N={n}: {r['note']}" for p in providers for n, r in zip(tokens, results[p]) if "note" in r]
    if device == "cuda":
        for i, n in enumerate(tokens):
            f, a, b = results["fused"][i], results["logits"][i], results["eager"][i]
            notes.append(f"N={n}: fused time / (a) logits = {f['ms'] / a['ms']:.2f} (target <= 1.15); "
                         f"fused memory / (b) eager = 1/{b['peak_mib'] / f['peak_mib']:.1f} (target <= 1/8)")
    return "\n".join(lines + [""] + [f"- {note}" for note in notes]) + "\n"


INTRO = ("`python -m benchmarks.linear_bench` (benchmarks/linear_bench.py): `fused_linear_wttm_loss` against (a) "
         "materialising both logits and calling `fused_wttm_loss` and (b) the paper's eager code on materialised "
         "logits.\n")


def write_results(path, device, subsection, section=SECTION, intro=INTRO):
    """Replaces the subsection ``### <device>`` of ``section`` of ``path``, leaving everything else as it was."""
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    match = re.search(rf"^{re.escape(section)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    subsections = {}
    if match:
        for block in re.split(r"^(?=### )", match.group(1), flags=re.M):
            if block.startswith("### "):
                subsections[block.split()[1].lower()] = block.rstrip() + "\n"
    subsections[device] = subsection
    body = f"{section}\n\n{intro}\n" + "\n".join(subsections[k] for k in sorted(subsections)) + "\n"
    if match:
        text = text[:match.start()] + body + text[match.end():]
    else:
        text = text.rstrip() + "\n\n" + body
    with open(path, "w") as f:
        f.write(text)


def plot(path, device, results, tokens, hidden, vocab, dtype):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for provider, rows in results.items():
        ax.plot(tokens, [r["peak_mib"] for r in rows], marker="o", label=provider)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens N")
    ax.set_ylabel("peak extra memory (MiB)")
    ax.set_title(f"{device.upper()}: H={hidden}, V={vocab}, {str(dtype).removeprefix('torch.')}, fwd+bwd")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")], help="N values, comma-separated")
    parser.add_argument("--chunks", type=lambda s: [int(t) for t in s.split(",")], default=[],
                        help="also time the fused loss at these explicit chunk sizes")
    parser.add_argument("--reps", type=int, default=None, help="timed steps (default 5 on CUDA, 3 on CPU)")
    parser.add_argument("--no-write", action="store_true", help="print only; write neither PNG nor RESULTS.md")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        provider, n, hidden, vocab, dtype, reps = args.worker
        cpu_worker(provider, int(n), int(hidden), int(vocab), getattr(torch, dtype), int(reps))
        return

    tokens, hidden, vocab, dtype = SHAPES[args.device]
    tokens = args.tokens or tokens
    reps = args.reps or (5 if args.device == "cuda" else 3)
    measure = measure_cuda if args.device == "cuda" else measure_cpu
    providers = ["fused"] + [f"fused[c={c}]" for c in args.chunks] + ["logits", "eager"]
    results = {p: [] for p in providers}
    for n in tokens:
        for p in providers:
            results[p].append(measure(p, n, hidden, vocab, dtype, reps))
            print(f"{p:>14} N={n:>6}: {results[p][-1]}", flush=True)
    command = "python -m benchmarks.linear_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    table = render(args.device, results, tokens, hidden, vocab, dtype, command.strip())
    print(table)
    if not args.no_write:
        plot(os.path.join(HERE, f"linear_memory_{args.device}.png"), args.device, results, tokens, hidden, vocab,
             dtype)
        write_results(os.path.join(HERE, "RESULTS.md"), args.device, table)


if __name__ == "__main__":
    main()
