#!/usr/bin/env bash
# Defaults study (issue 19): train one run of the grid on one CPU thread, keeping every checkpoint.
# Usage: bash docs/results/defaults/train.sh RUNS_DIR NAME LORA WEIGHTING
#   LORA: official (q_proj + v_proj, r 32, alpha 16: DRSY/EMO finetune_lora.sh) or all-linear (r 16, alpha 32)
#   WEIGHTING: mle | emo_anchored | mle_anchored.  RUNS_DIR must hold `calib` (see docs/results.md, defaults study).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
RUNS="$1"; NAME="$2"; LORA="$3"; WEIGHTING="$4"
PYTHON="${PYTHON:-$(command -v python)}"
MODEL="${EMO_STUDY_MODEL:-$HOME/.cache/emo_calibrate/smollm2/SmolLM2-135M-Instruct}"
export PYTHONPATH="$(cd "$HERE/../../.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
THREADS="${EMO_STUDY_THREADS:-1}"
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
case "$LORA" in
  official) lora=(--lora_r 32 --lora_alpha 16 --lora_target_modules q_proj v_proj) ;;
  all-linear) lora=(--lora_r 16 --lora_alpha 32 --lora_target_modules all-linear) ;;
  *) echo "LORA must be official or all-linear, not '$LORA'" >&2; exit 2 ;;
esac
out="$RUNS/$NAME"
echo "[study] $NAME: lora=$LORA emo_weighting=$WEIGHTING -> $out ($(date -u +%H:%M:%S))"
/usr/bin/time -v "$PYTHON" -m emo_calibrate.cli.main train --config "$HERE/study.yaml" --model_name_or_path "$MODEL" \
  --dataset_name "$RUNS/calib" "${lora[@]}" --emo_weighting "$WEIGHTING" \
  --output_dir "$out" --overwrite --perplexity false --generation_sample false --disable_tqdm true > "$RUNS/$NAME.log" 2>&1
echo "[study] $NAME: finished ($(date -u +%H:%M:%S))"
