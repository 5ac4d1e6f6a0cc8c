#!/usr/bin/env bash
# Calibration study (issue 13, item 3): evaluate the trained runs against the base model on one CPU thread.
# Usage: bash docs/results/study/eval_runs.sh RUNS_DIR OUT_DIR LABEL=PATH [LABEL=PATH ...]
#   e.g. bash docs/results/study/eval_runs.sh runs runs/eval_main base=$SMOL mle=runs/mle emo=runs/emo
# Held-out text: the test split of RUNS_DIR/calib (22 Wikipedia articles never trained on).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
RUNS="$1"; OUT="$2"; shift 2
PYTHON="${PYTHON:-$(command -v python)}"
export PYTHONPATH="$(cd "$HERE/../../.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's emo_calibrate
THREADS="${EMO_STUDY_THREADS:-1}"  # torch threads; 1 on the shared 2-core machine
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
/usr/bin/time -v "$PYTHON" -m emo_calibrate.cli.main eval --models "$@" \
  --eval_data "$RUNS/calib" --split test --max_eval_words 30000 \
  --metrics perplexity calibration generation icl \
  --num_prompts 300 --seeds 0 --decoding sample greedy --featurizer base \
  --icl_tasks rt-polarity trec bbc-news subj --icl_max_examples 300 \
  --output_dir "$OUT" --overwrite
