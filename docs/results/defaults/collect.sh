#!/usr/bin/env bash
# Defaults study (issue 19): copy the raw results of RUNS_DIR into docs/results/defaults/raw/ (run after every
# training or evaluation: a study machine may be gone at the next session). Per run: trainer_state.json (the last
# checkpoint's while it trains), the training record emo_training.json, the log's last lines; per evaluation:
# results.json, report.md and the greedy continuations (samples/).
# Usage: bash docs/results/defaults/collect.sh RUNS_DIR
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
RUNS="$1"; RAW="$HERE/raw"
mkdir -p "$RAW/runs" "$RAW/eval"
cp "$RUNS/calib/manifest.json" "$RAW/calib_manifest.json"
for run in "$RUNS"/*_*/; do
  name="$(basename "$run")"; dest="$RAW/runs/$name"; mkdir -p "$dest"
  state="$run/trainer_state.json"; record="$run/emo_training.json"
  last="$(ls -d "$run"checkpoint-* 2>/dev/null | sort -t- -k2 -n | tail -1 || true)"
  [ -f "$state" ] || state="$last/trainer_state.json"
  [ -f "$record" ] || record="$last/emo_training.json"
  [ -f "$state" ] && cp "$state" "$dest/trainer_state.json"
  [ -f "$record" ] && cp "$record" "$dest/emo_training.json"
  [ -f "$RUNS/$name.log" ] && tail -n 40 "$RUNS/$name.log" | tr '\r' '\n' | tail -n 40 > "$dest/train.log.tail"
done
for ev in "$RUNS"/eval/*/; do
  name="$(basename "$ev")"
  grep -q '"skipped"' "$ev/results.json" 2>/dev/null && continue
  [ -f "$ev/results.json" ] || continue
  mkdir -p "$RAW/eval/$name"
  cp "$ev/results.json" "$ev/report.md" "$RAW/eval/$name/"
  [ -d "$ev/samples" ] && cp -r "$ev/samples" "$RAW/eval/$name/"
done
echo "collected into $RAW"
