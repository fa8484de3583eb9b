"""Writes a run's tables into benchmarks/RESULTS.md, under "## Loss benchmark suite (issue 4)".

    python -m benchmarks.results_md benchmarks/results/quick-cpu.json
    python -m benchmarks.results_md $OUT/gpu.json --title "GPU check (gpu_check.sh)" --images results/

Only the subsection ``### <title>`` of this section is replaced (or appended); the other sections of
RESULTS.md (other issues' benchmarks) are left as they are. The numbers come from the JSON only, so the
file shows nothing that was not measured.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "RESULTS.md")
SECTION = "## Loss benchmark suite (issue 4)"
SECTION_INTRO = """\
`python -m benchmarks` (benchmarks/cli.py) times forward (`fwd`), backward alone (`bwd`) and both (`full`) of the
WTTM loss (gamma=0.2, beta=1, ce_weight=1, with targets) for each provider:

- `fused`: `fused_wttm_loss`, backend "auto" (the `backend` column of the CSV says Triton, the C++ kernel, or the reference fallback);
- `eager`: `reference.paper_wttm_loss`, the paper's code;
- `compile`: `torch.compile` of it;
- `liger`: Liger's KL kernel on log-softmax inputs (CUDA only);
- `fused_inplace`: `fused` with `inplace_backward=True` (when asked for).

Definitions are in the docstrings of `benchmarks/measure.py` and `benchmarks/providers.py`:

- time: median (p20-p80) of the timed calls;
- peak: the **extra** peak over what was allocated when the call started;
- %copy: the bytes model over the time, as a percentage of the device copy bandwidth measured in the same run;
- per-call fixed cost: the median forward + backward time on a tiny problem (N = 2, V = 8), whose arithmetic is
  negligible: what every call pays whatever its size (`runner.fixed_cost_us`).

The bytes model counts 2NVb for `fwd`, 1NVb for `bwd` and 3NVb for `full`. Compare providers on `full`.
"""


def fixed_cost_line(meta: dict) -> str:
    n, v = meta["fixed_cost_case"]
    costs = ", ".join(f"{k} {us:.0f}" for k, us in meta["fixed_cost_us"].items())
    return f"Per-call fixed cost (forward + backward, N={n}, V={v}, fp32; median us): {costs}"


def _num(x):
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def render(doc: dict, title: str, images: str) -> str:
    meta, rows, cfg = doc["meta"], doc["rows"], doc.get("config", {})
    ok = [r for r in rows if r["status"] == "ok"]
    provs = []
    for r in rows:
        if r["provider"] not in provs:
            provs.append(r["provider"])
    eager = {(r["dtype"], r["N"], r["V"], r["mode"]): r["median_ms"] for r in ok if r["provider"] == "eager"}
    backends = sorted({f"{r['provider']}={r['backend']}" for r in rows})
    lines = [
        f"### {title}",
        "",
        f"- Device: {meta['device_name']}; copy bandwidth {meta['copy_gbps']:.1f} GB/s (read + write, "
        f"{meta.get('copy_buffer_mib', 0):.0f} MiB buffer).",
        f"- Software: torch {meta['torch']}, triton {meta['triton']}, Python {meta['python']}; "
        f"commit `{meta['commit']}`.",
        f"- Date: {meta['date_utc']} UTC. Wall time {meta.get('wall_s', float('nan')):.1f} s. "
        f"Threads: {meta['threads']}.",
        f"- Load average: {meta.get('loadavg_1m_at_start')} at the start, {meta.get('loadavg_1m_at_end')} at the "
        f"end, on {meta.get('cpu_count')} cores.",
        f"- Command: `{meta['command']}`",
        f"- Backends: {', '.join(backends)}.",
    ]
    if meta.get("fixed_cost_us"):
        lines.append(f"- {fixed_cost_line(meta)}.")
    for note in doc.get("notes", []):
        lines.append(f"- Note: {note}")
    lines += ["", "Median ms (p20-p80), extra peak MiB, % of copy bandwidth, and speed-up over eager (x):", ""]
    head = "| dtype | N | V | mode | " + " | ".join(provs) + " |"
    lines += [head, "|" + "---|" * (4 + len(provs))]
    keys = []
    for r in rows:
        k = (r["dtype"], r["N"], r["V"], r["mode"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        cells = []
        for p in provs:
            r = next((x for x in rows if (x["dtype"], x["N"], x["V"], x["mode"]) == k and x["provider"] == p), None)
            if r is None:
                cells.append("")
            elif r["status"] != "ok":
                cells.append(f"{r['status']}: {r.get('note', '')}")
            else:
                cell = f"{r['median_ms']:.3f} ({r['p20_ms']:.3f}-{r['p80_ms']:.3f})"
                cell += f", {r['peak_mib']:.1f} MiB" if _num(r.get("peak_mib")) else ""
                cell += f", {100 * r['frac_copy_bw']:.1f}%"
                base = eager.get(k)
                if base and p != "eager":
                    cell += f", x{base / r['median_ms']:.2f}"
                cells.append(cell)
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | " + " | ".join(cells) + " |")
    tag = cfg.get("tag", "bench")
    if images is not None:
        lines += ["", f"![median time against V]({images}{tag}_time.png)",
                  f"![extra peak memory against V]({images}{tag}_memory.png)"]
    return "\n".join(lines) + "\n"


def update(text: str, title: str, body: str) -> str:
    """``text`` with subsection ``### title`` of SECTION replaced by ``body`` (appended if absent)."""
    if SECTION not in text:
        text = text.rstrip("\n") + "\n\n" + SECTION + "\n\n" + SECTION_INTRO + "\n"
    start = text.index(SECTION)
    nxt = re.search(r"^## ", text[start + len(SECTION):], flags=re.M)
    end = start + len(SECTION) + nxt.start() if nxt else len(text)
    section = text[start:end]
    head = f"### {title}\n"
    if head in section:
        s = section.index(head)
        n = re.search(r"^### ", section[s + len(head):], flags=re.M)
        e = s + len(head) + n.start() if n else len(section)
        section = section[:s] + body + ("\n" if n else "") + section[e:]
    else:
        section = section.rstrip("\n") + "\n\n" + body
    if not section.endswith("\n\n") and end < len(text):
        section = section.rstrip("\n") + "\n\n"
    return text[:start] + section + text[end:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.results_md", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json_path")
    ap.add_argument("--title", default=None, help="subsection title (default: '<device> <preset> run')")
    ap.add_argument("--images", default="results/",
                    help="path prefix of the PNGs relative to RESULTS.md ('' for none)")
    ap.add_argument("--results", default=RESULTS, help="the Markdown file to update")
    args = ap.parse_args(argv)
    with open(args.json_path) as f:
        doc = json.load(f)
    title = args.title or f"{doc['meta']['device'].upper()}: `{doc.get('config', {}).get('tag', '')}`"
    body = render(doc, title, args.images if args.images != "" else None)
    text = open(args.results).read() if os.path.exists(args.results) else "# Benchmark results\n"
    with open(args.results, "w") as f:
        f.write(update(text, title, body))
    print(f"updated {args.results}: {title}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
