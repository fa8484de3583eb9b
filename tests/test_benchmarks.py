"""The benchmark suite works: ``python -m benchmarks`` end to end on a tiny CPU sweep, and its parts.

Seconds in all: tiny shapes, short timing windows, and no ``compile`` provider in the end-to-end run
(its correctness is checked once, on one tiny shape).
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks import measure, providers as P  # noqa: E402
from benchmarks.runner import Config, run  # noqa: E402


def test_cli_quick_machinery_end_to_end(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--N", "8", "--V", "100,300", "--dtypes", "fp32",
           "--providers", "fused,eager", "--modes", "fwd,bwd,full", "--warmup-ms", "1", "--rep-ms", "2",
           "--min-reps", "5", "--copy-mib", "32", "--out", str(out), "--tag", "t", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "copy bandwidth" in proc.stdout and "median ms" in proc.stdout
    assert "Per-call fixed cost (forward + backward, N=2, V=8, fp32; median us): fused " in proc.stdout

    with open(out / "t.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 3  # V x providers x modes
    assert {r["status"] for r in rows} == {"ok"}
    for r in rows:
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert float(r["eff_gbps"]) > 0 and 0 < float(r["frac_copy_bw"])
        assert r["device"] == "cpu" and r["torch"] == torch.__version__ and r["commit"]
    doc = json.loads((out / "t.json").read_text())
    assert doc["meta"]["copy_gbps"] > 0 and len(doc["rows"]) == len(rows)
    assert set(doc["meta"]["fixed_cost_us"]) == {"fused", "eager"}
    assert all(0 < us < 1e5 for us in doc["meta"]["fixed_cost_us"].values())
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plots failed" in proc.stdout  # reported, not fatal
        return
    for name in ("t_time.png", "t_memory.png"):
        assert (out / name).stat().st_size > 1000


def test_skips_instead_of_crashing(tmp_path):
    """A combination estimated not to fit, and a spent time budget, become skipped rows."""
    cfg = Config(device="cpu", cases=[(4, 50, "fp32")], providers=["eager"], modes=["full"], out=str(tmp_path),
                 tag="m", mem_fraction=1e-12, plots=False, progress=False, copy_mib=8)
    doc = run(cfg)
    assert [r["status"] for r in doc["rows"]] == ["skipped"] and "estimated" in doc["rows"][0]["note"]
    cfg = Config(device="cpu", cases=[(4, 50, "fp32")], providers=["eager"], modes=["full"], out=str(tmp_path),
                 tag="b", time_budget_s=0.0, plots=False, progress=False, copy_mib=8)
    doc = run(cfg)
    assert [r["status"] for r in doc["rows"]] == ["skipped"] and "budget" in doc["rows"][0]["note"]


def test_unavailable_provider_is_noted_not_fatal(tmp_path):
    cfg = Config(device="cpu", cases=[(4, 50, "fp32")], providers=["liger", "eager"], modes=["fwd"],
                 out=str(tmp_path), tag="l", plots=False, progress=False, warmup_ms=1, rep_ms=1, min_reps=3, copy_mib=8)
    doc = run(cfg)
    assert [r["provider"] for r in doc["rows"]] == ["eager"]
    assert any("liger" in n for n in doc["notes"])


@pytest.mark.parametrize("name", ["fused", "compile"])
def test_providers_compute_the_paper_loss(name):
    case = P.make_case(6, 97, torch.float32, "cpu")
    z, v, y = case.z[0], case.t[0], case.y[0]
    want = P.get_provider("eager", "cpu").loss(z, v, y)
    (want_grad,) = torch.autograd.grad(want, z)
    try:
        got = P.get_provider(name, "cpu").loss(z, v, y)
        (got_grad,) = torch.autograd.grad(got, z)
    except Exception as exc:  # noqa: BLE001
        if name == "compile" and "BackendCompilerFailed" in type(exc).__name__:
            pytest.skip(f"torch.compile has no working CPU toolchain here: {str(exc).splitlines()[0][:200]}")
        raise
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)


def test_liger_formula_gives_the_paper_loss():
    """The Liger provider's folding of U into a log-target KL, with torch's kl_div (the same formula as
    LigerKLDIVLoss(reduction="batchmean", log_target=True)) standing in for Liger's kernel."""
    case = P.make_case(6, 97, torch.float64, "cpu")
    z, v, y = case.z[0], case.t[0], case.y[0]
    want = P.get_provider("eager", "cpu").loss(z, v, y)
    (want_grad,) = torch.autograd.grad(want, z)
    got = P.kl_weighted_wttm(z, v, y, lambda a, b: F.kl_div(a, b, reduction="batchmean", log_target=True))
    (got_grad,) = torch.autograd.grad(got, z)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-12)


def test_cpu_peak_memory_sees_an_allocation():
    if not measure.cpu_peak_supported():
        pytest.skip("/proc/self/clear_refs is not writable here")
    measure.pin_malloc_mmap_threshold()
    mib = 64

    def run_fn(i, state):
        return torch.ones(mib << 18).sum()  # 64 MiB of fp32, touched, freed

    peaks = [measure.peak_extra_bytes(lambda i: None, run_fn, "cpu")[0] / 2**20 for _ in range(2)]
    for peak in peaks:  # the second call must see it too: the freed buffer went back to the kernel
        assert mib - 1 <= peak <= mib + 16, peaks


def test_bytes_model_and_quantiles():
    assert P.bytes_moved("fwd", 4, 1000, torch.bfloat16) == 2 * 4 * 1000 * 2
    assert P.bytes_moved("bwd", 4, 1000, torch.float32) == 1 * 4 * 1000 * 4
    assert P.bytes_moved("full", 4, 1000, torch.float32) == 3 * 4 * 1000 * 4
    assert measure.quantile([1, 2, 3, 4, 5], 0.5) == 3
    assert math.isclose(measure.quantile([1, 2, 3, 4, 5], 0.2), 1.8)


def test_gpu_check_script_parses():
    proc = subprocess.run(["bash", "-n", os.path.join(REPO, "benchmarks", "gpu_check.sh")], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr


def test_results_md_replaces_only_its_subsection():
    from benchmarks import results_md

    text = "# Benchmark results\n\n## Other issue\n\nkeep me\n"
    once = results_md.update(text, "Run A", "### Run A\n\nfirst\n")
    twice = results_md.update(once, "Run A", "### Run A\n\nsecond\n")
    both = results_md.update(twice, "Run B", "### Run B\n\nthird\n")
    assert "keep me" in both and "first" not in both and "second" in both and "third" in both
    assert both.index("## Other issue") < both.index(results_md.SECTION) < both.index("Run A") < both.index("Run B")
    assert both.count("### Run A") == 1


@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_trl_bench_providers_take_the_same_step(divergence):
    """benchmarks.trl_bench compares like with like: ours, TRL's and Liger's steps give the student's hidden
    states and head the same gradients (each provider whose package is installed)."""
    from benchmarks import trl_bench

    providers = [p for p in trl_bench.PROVIDERS if trl_bench.available(p)]
    if len(providers) < 2:
        pytest.skip("neither trl nor liger_kernel is installed: nothing to compare ours with")
    grads = {}
    for provider in providers:
        x = trl_bench.make_inputs(24, 16, 300, torch.float32, "cpu")
        trl_bench.step_fn(provider, trl_bench.DIVERGENCES[divergence], x)()
        grads[provider] = (x["h_s"].grad, x["w_s"].grad)
    for provider in providers[1:]:
        for ours, theirs in zip(grads["ours"], grads[provider]):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
