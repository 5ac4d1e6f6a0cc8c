#!/usr/bin/env bash
# Install emo_calibrate with its test extras into ./.venv (CPU torch first), then run the fast, offline test suite.
# Tests marked `slow` (real demo model) and `gpu` (CUDA) are deselected here; run them with `-m slow` / `-m gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
# The CPU build of torch first: a bare `torch` requirement with no torch installed would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -m "not slow and not gpu" "$@"
