#!/usr/bin/env bash
# One-time set-up on a fresh machine, safe to rerun: torch (only where none is installed: a user's CUDA
# build is never replaced), then this project with its extension built by ninja, and its test, training
# and benchmark extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q ninja setuptools wheel
"$PY" -m pip install -q --no-build-isolation --use-pep517 -e ".[test,train,bench]"
