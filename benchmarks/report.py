"""PNG plots of a sweep: median time and extra peak memory against V, one line per provider.

Two figures, ``<tag>_time.png`` and ``<tag>_memory.png``; each has one row of panels per mode and one
column per (dtype, N). Both axes are logarithmic (memory on a symmetric-log axis, linear below 1 MiB, so
that a provider with no extra memory still shows). Matplotlib's Agg backend: no display needed.
"""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"fused": ("tab:red", "o"), "fused_inplace": ("tab:purple", "D"), "eager": ("tab:blue", "s"),
         "compile": ("tab:green", "^"), "liger": ("tab:orange", "v")}


def plot(rows: list, out: str, tag: str, meta: dict) -> list:
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return []
    modes = [m for m in ("fwd", "bwd", "full") if any(r["mode"] == m for r in ok)]
    columns = sorted({(r["dtype"], r["N"]) for r in ok}, key=lambda c: (c[0], c[1]))
    provs = sorted({r["provider"] for r in ok}, key=lambda p: list(STYLE).index(p) if p in STYLE else 99)
    paths = []
    for metric, label, fname in (("median_ms", "median time (ms)", "time"),
                                 ("peak_mib", "extra peak memory (MiB)", "memory")):
        fig, axes = plt.subplots(len(modes), len(columns), figsize=(4.2 * len(columns), 3.2 * len(modes)),
                                 squeeze=False, sharex=True)
        for i, mode in enumerate(modes):
            for j, (dtype, n) in enumerate(columns):
                ax = axes[i][j]
                for prov in provs:
                    pts = sorted((r["V"], r[metric]) for r in ok if r["mode"] == mode and r["dtype"] == dtype
                                 and r["N"] == n and r["provider"] == prov and r[metric] == r[metric])
                    if not pts:
                        continue
                    color, marker = STYLE.get(prov, (None, "x"))
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=prov)
                ax.set_xscale("log")
                if metric == "peak_mib":
                    ax.set_yscale("symlog", linthresh=1.0)
                    ax.set_ylim(bottom=0)
                else:
                    ax.set_yscale("log")
                ax.set_title(f"{mode}  {dtype}  N={n}", fontsize=9)
                ax.grid(True, which="both", alpha=0.3)
                if i == len(modes) - 1:
                    ax.set_xlabel("V (vocabulary)")
                if j == 0:
                    ax.set_ylabel(label)
                ax.legend(fontsize=7)
        fig.suptitle(f"WTTM loss, {meta.get('device_name', '')}; torch {meta.get('torch', '')}, "
                     f"commit {meta.get('commit', '')}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out, f"{tag}_{fname}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    """``python -m benchmarks.report RESULTS.json [--out DIR]``: the plots again from a run's JSON, e.g. on
    a machine with matplotlib when the GPU machine that ran the sweep had none."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__)
    ap.add_argument("json_path")
    ap.add_argument("--out", default=None, help="folder for the PNGs (default: the JSON's folder)")
    ap.add_argument("--tag", default=None, help="file-name prefix (default: the JSON's config tag)")
    args = ap.parse_args(argv)
    with open(args.json_path) as f:
        doc = json.load(f)
    out = args.out or os.path.dirname(os.path.abspath(args.json_path))
    os.makedirs(out, exist_ok=True)
    tag = args.tag or doc.get("config", {}).get("tag", "bench")
    for path in plot(doc["rows"], out, tag, doc.get("meta", {})):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
