#!/usr/bin/env bash
# Calibration study (issue 13, item 3): train the runs one after the other on one CPU thread.
# Usage: bash docs/results/study/train_runs.sh RUNS_DIR NAME:WEIGHTING:SEED [NAME:WEIGHTING:SEED ...]
#   e.g. bash docs/results/study/train_runs.sh runs/study mle:mle:0 emo:emo_anchored:0
# RUNS_DIR must hold `calib` (built by `emo-calibrate data`, see study.md); each run goes to RUNS_DIR/NAME.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
RUNS="$1"; shift
PYTHON="${PYTHON:-$(command -v python)}"
MODEL="${EMO_STUDY_MODEL:-$HOME/.cache/emo_calibrate/smollm2/SmolLM2-135M-Instruct}"
export PYTHONPATH="$(cd "$HERE/../../.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's emo_calibrate
THREADS="${EMO_STUDY_THREADS:-1}"  # torch threads; 1 on the shared 2-core machine
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
for spec in "$@"; do
  IFS=: read -r name weighting seed <<< "$spec"
  out="$RUNS/$name"
  if [ -f "$out/adapter_config.json" ]; then echo "[study] $name: done already"; continue; fi
  echo "[study] $name: emo_weighting=$weighting seed=$seed -> $out ($(date -u +%H:%M:%S))"
  /usr/bin/time -v "${PYTHON:-python}" -m emo_calibrate.cli.main train --config "$HERE/study.yaml" --model_name_or_path "$MODEL" \
    --dataset_name "$RUNS/calib" --emo_weighting "$weighting" --seed "$seed" --data_seed "$seed" \
    --output_dir "$out" --overwrite --perplexity false > "$RUNS/$name.log" 2>&1
  echo "[study] $name: finished ($(date -u +%H:%M:%S))"
done
