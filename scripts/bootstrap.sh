#!/usr/bin/env bash
# One-time set-up on a fresh machine, safe to rerun: torch (only where none is installed: a user's CUDA
# build is never replaced), then this project with its extension built by ninja and its test, training,
# benchmark and Hugging Face extras (the integration's tests run in CI), and the demo's Fashion-MNIST files
# (Debian's dataset-fashion-mnist) where apt can.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q ninja setuptools wheel
# PEP 517 without isolation: the extension builds against the torch installed above.
"$PY" -m pip install -q --no-build-isolation --use-pep517 -e ".[test,train,bench,hf]"

FASHION_MNIST=/usr/share/datasets/fashion-mnist
if [ ! -d "$FASHION_MNIST" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
            >/dev/null || echo "bootstrap: could not install dataset-fashion-mnist; the demo needs it" >&2
    else
        echo "bootstrap: the demo needs Fashion-MNIST in $FASHION_MNIST: apt-get install dataset-fashion-mnist" >&2
    fi
fi
