#!/usr/bin/env bash
# The one command of the GPU proof, on a GPU machine without network (see benchmarks/README.md, "GPU proof").
#
#   bash benchmarks/gpu/fetch_wheels.sh                 # once, on a machine with network: fills .whl/
#   OUT=/some/folder bash benchmarks/gpu/run_gpu_proof.sh [gpu_proof.py options]
#
# 1. installs the carried wheels (.whl/*.whl: what the GPU image lacks) into /tmp/site, in front of the image's
#    packages, and puts this checkout on PYTHONPATH (no build, no network);
# 2. runs benchmarks/gpu/gpu_proof.py (7B-class QLoRA, TRL SFTTrainer vs EMOTrainer, merge check), which writes
#    $OUT/gpu_results.{json,md} after every configuration, under a hard time limit;
# 3. runs the GPU tests (pytest -m gpu on every test file that has some);
# 4. prints the results table last.
# Budget: under 8 minutes in all. SKIP_WHEELS=1 skips step 1 (to try the script where the packages are installed).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-outputs/gpu_proof}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
    TOKENIZERS_PARALLELISM=false WANDB_DISABLED=true
PROOF_LIMIT=${PROOF_LIMIT:-340}  # seconds; gpu_proof.py starts no training run after its --time-budget (250 s)
TEST_LIMIT=${TEST_LIMIT:-100}
start=$(date +%s)
stamp() { echo "[$(date +%H:%M:%S) +$(($(date +%s) - start))s] $*"; }

if [ "${SKIP_WHEELS:-0}" != 1 ]; then
    stamp "installing the carried wheels: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"

stamp "environment" | tee "$OUT/env.txt"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    git rev-parse HEAD 2>/dev/null || echo "git: no repository here"
    python3 - <<'EOF'
import importlib, importlib.metadata as md, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "huggingface_hub",
             "tokenizers", "safetensors", "pyarrow", "fsspec", "dill", "multiprocess", "regex", "numpy", "pandas",
             "pytest"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {md.version(name)} {getattr(module, '__file__', '')}")
    except Exception as error:  # noqa: BLE001 - a report, not a check
        print(f"{name}: {type(error).__name__}: {error}")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
EOF
} 2>&1 | tee -a "$OUT/env.txt"

stamp "gpu_proof.py (limit ${PROOF_LIMIT}s)"
timeout -k 10 "$PROOF_LIMIT" python3 benchmarks/gpu/gpu_proof.py --out "$OUT" --time-budget 250 "$@" 2>&1 \
    | tee "$OUT/gpu_proof.log"
proof_rc=${PIPESTATUS[0]}
stamp "gpu_proof.py exit code $proof_rc (124 = stopped at the time limit; results so far are in $OUT)"

# Only the test files that hold GPU tests are collected: the others may import what the GPU image lacks (POT, ...).
gpu_tests=$(grep -rl --include='test_*.py' 'mark.gpu' tests | sort | tr '\n' ' ')
stamp "pytest -m gpu $gpu_tests(limit ${TEST_LIMIT}s)"
# shellcheck disable=SC2086
timeout -k 10 "$TEST_LIMIT" python3 -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
    $gpu_tests 2>&1 | tee "$OUT/pytest_gpu.log"
test_rc=${PIPESTATUS[0]}
stamp "pytest exit code $test_rc"

echo
tail -n 3 "$OUT/pytest_gpu.log"
echo
cat "$OUT/gpu_results.md" 2>/dev/null || echo "no results table was written"
stamp "total $(($(date +%s) - start))s; proof rc $proof_rc, tests rc $test_rc"
[ "$proof_rc" = 0 ] && [ "$test_rc" = 0 ]
