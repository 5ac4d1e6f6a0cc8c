#!/usr/bin/env bash
# Defaults study (issue 19): evaluate the base model, then each checkpoint step of the given runs as soon as every
# run has written it (one evaluation at a time, beside the trainings). Greedy generation at GEN_STEPS only.
# Usage: bash docs/results/defaults/checkpoints.sh RUNS_DIR "STEPS" "GEN_STEPS" RUN [RUN ...]
#   e.g. bash docs/results/defaults/checkpoints.sh runs/study19 "52 104 156 208 260 312" "104 208 312" off_mle off_emo
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
RUNS="$1"; STEPS="$2"; GEN_STEPS="$3"; shift 3
MODEL="${EMO_STUDY_MODEL:-$HOME/.cache/emo_calibrate/smollm2/SmolLM2-135M-Instruct}"
mkdir -p "$RUNS/eval"
if [ ! -f "$RUNS/eval/base/results.json" ]; then
  bash "$HERE/eval.sh" "$RUNS" "$RUNS/eval/base" cheap "base=$MODEL" > "$RUNS/eval/base.log" 2>&1
fi
for step in $STEPS; do
  [ -f "$RUNS/eval/step-$step/results.json" ] && continue
  models=()
  for run in "$@"; do
    ckpt="$RUNS/$run/checkpoint-$step"
    until [ -f "$ckpt/trainer_state.json" ]; do sleep 30; done
    models+=("$run-$step=$ckpt")
  done
  mode=ppl; [[ " $GEN_STEPS " == *" $step "* ]] && mode=cheap
  echo "[study] eval step $step ($mode): ${models[*]} ($(date -u +%H:%M:%S))"
  bash "$HERE/eval.sh" "$RUNS" "$RUNS/eval/step-$step" "$mode" "${models[@]}" > "$RUNS/eval/step-$step.log" 2>&1
done
echo "[study] evaluations done ($(date -u +%H:%M:%S))"
