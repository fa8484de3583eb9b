#!/usr/bin/env bash
# One-time set-up, safe to rerun:  bash scripts/bootstrap.sh [EXTRA ...]
#
# The base install serves the demos and the test suite: torch (only where none is installed: a user's CUDA
# build is never replaced), then this project with its C++ extension built by ninja, with the extras
# `train` (the demos and the trainer) and `test` (pytest, triton for its interpreter, numpy); and the demo's
# Fashion-MNIST files (Debian's dataset-fashion-mnist) where apt can install them.
# Optional extras, by name (`all` = every one):
#   hf     the Hugging Face Trainer / TRL integration and its tests (transformers, accelerate, trl: ~450 MB),
#          and liger-kernel for the tests against Liger's loss
#   bench  the benchmark suite under pytest-benchmark (`pytest benchmarks/ --benchmark-only`)
# Without `hf` the tests of that integration are skipped, each with its reason; CI installs every extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
KNOWN_EXTRAS="hf bench"

extras="train,test"
for name in "$@"; do
    case "$name" in
        all) for extra in $KNOWN_EXTRAS; do extras="$extras,$extra"; done ;;
        hf|bench) extras="$extras,$name" ;;
        *) echo "bootstrap: unknown extra '$name': choose from $KNOWN_EXTRAS, all" >&2; exit 2 ;;
    esac
done

if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q ninja setuptools wheel
# PEP 517 without isolation: the extension builds against the torch installed above.
"$PY" -m pip install -q --no-build-isolation --use-pep517 -e ".[$extras]"
echo "bootstrap: installed ttm-kernels[$extras] into $("$PY" -c 'import sys; print(sys.prefix)')"

FASHION_MNIST=/usr/share/datasets/fashion-mnist
if [ ! -d "$FASHION_MNIST" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
                >/dev/null 2>&1; then
            echo "bootstrap: apt installed dataset-fashion-mnist (Fashion-MNIST for the demo, $(du -sh "$FASHION_MNIST" | cut -f1) in $FASHION_MNIST)"
        else
            echo "bootstrap: could not install dataset-fashion-mnist with apt; the demo needs it" >&2
        fi
    else
        echo "bootstrap: the demo needs Fashion-MNIST in $FASHION_MNIST: apt-get install dataset-fashion-mnist" >&2
    fi
fi
