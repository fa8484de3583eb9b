"""Compact summary of a results CSV: ``python -m benchmarks.summary out/x/gpu.csv``.

One line per (dtype, N, V, mode): each provider's median ms, extra peak MiB and fraction of the copy
bandwidth, and its speed-up over eager; short enough for the tail of a log.
"""
from __future__ import annotations

import csv
import sys


def summarize(path: str) -> str:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return f"{path}: no rows"
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["dtype"], int(r["N"]), int(r["V"]), r["mode"]), []).append(r)
    first = rows[0]
    lines = [f"{first['device_name']} | torch {first['torch']} | triton {first['triton']} | commit "
             f"{first['commit']} | copy {float(first['copy_gbps']):.0f} GB/s",
             "case: provider median_ms/peak_MiB/%copy (x eager)"]
    for (dtype, n, v, mode), rs in groups.items():
        eager = next((float(r["median_ms"]) for r in rs if r["provider"] == "eager" and r["status"] == "ok"), None)
        cells = []
        for r in rs:
            if r["status"] != "ok":
                cells.append(f"{r['provider']} {r['status']}")
                continue
            ms = float(r["median_ms"])
            peak = r["peak_mib"]
            peak = f"{float(peak):.0f}" if peak not in ("", "nan") else "-"
            cell = f"{r['provider']} {ms:.3f}/{peak}/{100 * float(r['frac_copy_bw']):.0f}%"
            if eager and r["provider"] != "eager":
                cell += f" (x{eager / ms:.1f})"
            cells.append(cell)
        lines.append(f"{dtype} N={n} V={v} {mode}: " + " | ".join(cells))
    skipped = sorted({r["note"] for r in rows if r["status"] != "ok" and r["note"]})
    lines += [f"note: {s}" for s in skipped[:10]]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for path in argv:
        print(summarize(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
