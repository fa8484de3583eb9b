#!/usr/bin/env bash
# The GPU machine's check, the one prepared device script, in one run of under 8 minutes, everything written
# under $OUT as it goes:
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh        (from the repo root; OUT defaults to out/gpu_check)
#
# Steps (each under its own `timeout`, so one hang cannot eat the budget; a failed step is recorded and the
# next one still runs):
#   0. environment: nvidia-smi, python/torch/triton versions, liger presence     -> $OUT/setup.log
#   1. pip install --no-build-isolation --no-deps -e .   (builds the C++ extension; <= 120 s; if pip
#      fails, `python setup.py build_ext --inplace` instead, <= 120 s)                          -> setup.log
#   2. python -m pytest $GPU_CHECK_TESTS (default: the loss, layout, row-pieces, divergence (reverse KL, JSD)
#      and fused linear tests, on CUDA tensors; <= 150 s; pytest.ini's "-q -ra" is replaced by "-ra" so that
#      the one -q still prints the "N passed" line)                                           -> tests.log
#   3. python -m benchmarks --preset gpu-check --device cuda: fused, eager, torch.compile, Liger (when its
#      wheel is installed) and the copy bandwidth, at N x V = 4096 x {32000, 128256, 262144} and 64 x 262144
#      (<= 150 s, with its own --time-budget 30 s shorter so that it writes its files by itself)
#                                                 -> bench.log, gpu.csv, gpu.json, gpu_time.png, gpu_memory.png
#   4. python -m benchmarks.tune_triton: split-row piece widths at 64 x 262144, then BLOCK_V x warps x stages
#      (<= 80 s, its own --time-budget 60 s)                                        -> tune.log, tune_triton.csv
#   5. python -m benchmarks.linear_bench --tokens 16384 --no-write: the fused linear loss against the
#      materialised logits (<= 60 s)                                                            -> linear.log
#   6. a compact summary of the results and the status of every step, on stdout and in setup.log.
# Liger: `pip install --no-deps .whl/liger_kernel-*.whl` first when such a wheel was carried (.whl/ is
# ignored by git; the device has no network).
# Ten files in all, none over a few MiB (logs are cut to their last 8 MiB just in case).
# Overall budget: $GPU_CHECK_BUDGET_S seconds (default 440; with the 20 s grace of the last `timeout` and
# the summary, under 8 minutes); each step's cap shrinks to leave the later steps their share.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/out/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET=${GPU_CHECK_BUDGET_S:-440}
T0=$(date +%s)
SETUP_LOG="$OUT/setup.log"
: > "$SETUP_LOG"
declare -a STATUS=()

log() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*" | tee -a "$SETUP_LOG"; }

# cap_for MAX RESERVE: seconds a step may take: MAX, or less so that RESERVE seconds stay for later steps.
cap_for() {
    local max=$1 reserve=$2 left
    left=$(( BUDGET - ($(date +%s) - T0) - reserve ))
    (( left < max )) && max=$left
    (( max < 15 )) && max=15
    echo "$max"
}

# run_step NAME CAP LOGFILE CMD...: runs CMD under timeout (SIGTERM at CAP, SIGKILL 20 s later), appends
# its output to LOGFILE, records "NAME rc=.. (..s)".
run_step() {
    local name=$1 cap=$2 logfile=$3 t rc
    shift 3
    t=$(date +%s)
    log "step $name: timeout ${cap}s: $*"
    timeout -k 20 "$cap" "$@" >> "$logfile" 2>&1
    rc=$?
    local took=$(( $(date +%s) - t ))
    local what="rc=$rc"
    (( rc == 124 || rc == 137 )) && what="TIMED OUT after ${took}s (rc=$rc)"
    STATUS+=("$name: $what (${took}s)")
    log "step $name done: $what in ${took}s"
    return $rc
}

# 0. Environment.
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "python: $PY"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'unknown (no git checkout here)')"
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv \
        2>&1 || echo "nvidia-smi: not available (no GPU visible?)"
    timeout 60 "$PY" - <<'EOF' 2>&1
import importlib.util, platform
print("python", platform.python_version())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", "SMs", p.multi_processor_count,
              "L2", getattr(p, "L2_cache_size", "?"))
except Exception as exc:
    print("torch import failed:", exc)
for mod in ("triton", "liger_kernel", "pytest", "pytest_benchmark", "matplotlib", "tqdm", "ninja", "setuptools"):
    spec = importlib.util.find_spec(mod)
    version = "missing"
    if spec is not None:
        try:
            version = getattr(__import__(mod), "__version__", "present")
        except Exception as exc:  # noqa: BLE001
            version = f"import failed: {exc}"
    print(f"{mod}: {version}")
EOF
} >> "$SETUP_LOG" 2>&1
log "environment recorded"

# The commit, for the benchmark rows, where git works here (the copy on the GPU machine may have no .git).
if [ -z "${TTM_GIT_COMMIT:-}" ]; then
    c=$(git rev-parse --short HEAD 2>/dev/null) && export TTM_GIT_COMMIT="$c"
fi

# 1. Install (editable, builds ttm_kernels._C with ninja; no network: no build isolation, no deps).
# Where pip cannot (an old setuptools without the `wheel` package has no bdist_wheel), build the extension
# in place instead: the tests and benchmarks import ttm_kernels from the repo root either way.
if ! run_step install "$(cap_for 120 300)" "$SETUP_LOG" \
        "$PY" -m pip install --no-build-isolation --no-deps --no-input -e .; then
    run_step build_ext "$(cap_for 120 300)" "$SETUP_LOG" "$PY" setup.py build_ext --inplace
fi
for wheel in .whl/liger_kernel-*.whl; do
    [ -f "$wheel" ] && run_step liger 60 "$SETUP_LOG" "$PY" -m pip install --no-deps --no-input "$wheel"
done
"$PY" -c "import ttm_kernels as t; print('ttm_kernels', t.__file__, 'triton', t.triton_available(), 'cpu ext', t.cpu_extension_available())" \
    >> "$SETUP_LOG" 2>&1

# 2. The test suite (CUDA tensors where the tests use them).
# The files that exercise CUDA (the trainer's tests are CPU tests); GPU_CHECK_TESTS replaces the list.
GPU_CHECK_TESTS=${GPU_CHECK_TESTS:-tests/test_fused_loss.py tests/test_layouts.py tests/test_row_pieces.py \
tests/test_triton_divergence.py tests/test_linear.py}
# shellcheck disable=SC2086
run_step tests "$(cap_for 150 230)" "$OUT/tests.log" \
    "$PY" -m pytest $GPU_CHECK_TESTS --maxfail=10 -q -o addopts=-ra -p no:cacheprovider --durations=15
echo >> "$OUT/tests.log"
tail -n 4 "$OUT/tests.log" | sed 's/^/  tests: /' | tee -a "$SETUP_LOG"

# 3. The benchmark sweep (150 s, leaving the tuning sweep, the linear benchmark and the summary theirs).
BENCH_CAP=$(cap_for 150 150)
BENCH_BUDGET=$(( BENCH_CAP - 30 ))
(( BENCH_BUDGET < 20 )) && BENCH_BUDGET=20
run_step bench "$BENCH_CAP" "$OUT/bench.log" \
    "$PY" -m benchmarks --preset gpu-check --device cuda --out "$OUT" --tag gpu \
    --providers fused,eager,compile,liger,fused_inplace --time-budget "$BENCH_BUDGET" --no-progress

# 4. The tuning sweep: split-row piece widths, then launch configurations.
TUNE_CAP=$(cap_for 80 70)
run_step tune "$TUNE_CAP" "$OUT/tune.log" \
    "$PY" -m benchmarks.tune_triton --out "$OUT" --time-budget $(( TUNE_CAP > 40 ? TUNE_CAP - 20 : 20 ))

# 5. The fused linear loss (H = 4096, V = 128256, bf16) against the materialised logits.
run_step linear "$(cap_for 60 10)" "$OUT/linear.log" \
    "$PY" -m benchmarks.linear_bench --device cuda --tokens 16384 --no-write

# 6. Summary.
{
    echo "=== summary ==="
    for s in "${STATUS[@]}"; do echo "  $s"; done
    if [ -s "$OUT/gpu.csv" ]; then
        timeout 30 "$PY" -m benchmarks.summary "$OUT/gpu.csv" 2>&1
    else
        echo "no benchmark rows; last lines of bench.log:"
        tail -n 15 "$OUT/bench.log" 2>/dev/null
    fi
} 2>&1 | tee -a "$SETUP_LOG"
for f in "$OUT"/*.log; do
    if [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt $(( 8 << 20 )) ]; then
        tail -c $(( 8 << 20 )) "$f" > "$f.tmp" && mv "$f.tmp" "$f"
    fi
done
ls -la "$OUT" | tee -a "$SETUP_LOG"
log "total $(( $(date +%s) - T0 ))s"
# Exit status: 0 when the tests and the benchmark both succeeded (an install that pip refused but
# build_ext managed does not count against it).
for s in "${STATUS[@]}"; do
    case "$s" in tests:*|bench:*) case "$s" in *"rc=0 "*) ;; *) exit 1 ;; esac ;; esac
done
exit 0
