#!/usr/bin/env bash
# Calibration study, second evaluation: the runs trained after the first one (mle_anchored, seed 1), on the same
# held-out text, ICL items and demonstrations as eval_runs.sh (everything is seeded), without MAUVE / sampling
# (greedy degeneration only) to fit the CPU budget. Paired comparisons against the base model: the `paired` section
# of results.json (emo_calibrate.evaluation.paired_statistics pairs models across reports).
# Usage: bash docs/results/study/eval_more.sh RUNS_DIR OUT_DIR LABEL=PATH [LABEL=PATH ...]
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
  --num_prompts 300 --decoding greedy --featurizer none \
  --icl_tasks rt-polarity trec bbc-news subj --icl_max_examples 300 \
  --output_dir "$OUT" --overwrite
