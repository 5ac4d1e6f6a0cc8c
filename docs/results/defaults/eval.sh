#!/usr/bin/env bash
# Defaults study (issue 19): evaluate models / checkpoints on the study's held-out text with `emo-calibrate eval`.
# Usage: bash docs/results/defaults/eval.sh RUNS_DIR OUT_DIR MODE LABEL=PATH [LABEL=PATH ...]
#   MODE ppl:   perplexity + calibration on 10k held-out words (every checkpoint)
#   MODE cheap: the same + greedy rep-n of 300 prompts x 80 tokens (every other checkpoint, as CPU time allows)
#   MODE final: the same + sampled continuations (seeds 0 1 2) and their MAUVE (featurizer: the base model), for the
#               finalists at the end of the epoch
#   MODE icl:   the paper's ICL protocol only (4 built-in tasks, 300 items each), for the finalists
#   MODE full:  final + icl in one process
# The held-out text, prompts, ICL items and demonstrations are seeded: every report scores the same units, so the
# reports pair across runs (emo_calibrate.evaluation.paired_statistics).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
RUNS="$1"; OUT="$2"; MODE="$3"; shift 3
PYTHON="${PYTHON:-$(command -v python)}"
export PYTHONPATH="$(cd "$HERE/../../.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
THREADS="${EMO_STUDY_THREADS:-1}"
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
common=(--eval_data "$RUNS/calib" --split test --max_eval_words 10000 --num_prompts 300 --generation_batch_size 50)
case "$MODE" in
  ppl) extra=(--metrics perplexity calibration) ;;
  cheap) extra=(--metrics perplexity calibration generation --decoding greedy --featurizer none) ;;
  final) extra=(--metrics perplexity calibration generation --decoding sample greedy --seeds 0 1 2 --featurizer base) ;;
  icl) extra=(--metrics icl --icl_tasks rt-polarity trec bbc-news subj --icl_max_examples 300) ;;
  full) extra=(--metrics perplexity calibration generation icl --decoding sample greedy --seeds 0 1 2 --featurizer base
               --icl_tasks rt-polarity trec bbc-news subj --icl_max_examples 300) ;;
  *) echo "MODE must be ppl, cheap, final, icl or full, not '$MODE'" >&2; exit 2 ;;
esac
/usr/bin/time -v "$PYTHON" -m emo_calibrate.cli.main eval --models "$@" "${common[@]}" "${extra[@]}" \
  --output_dir "$OUT" --overwrite
