#!/usr/bin/env bash
# The one command of the GPU proof, on a GPU machine without network (see benchmarks/README.md, "GPU proof").
#
#   bash benchmarks/gpu/fetch_wheels.sh                 # once, on a machine with network: fills .whl/
#   OUT=/some/folder bash benchmarks/gpu/run_gpu_proof.sh [gpu_proof.py options]
#   SKIP_WHEELS=1 OUT=/tmp/dry bash benchmarks/gpu/run_gpu_proof.sh --dry-run      # the CPU dry run (CI runs it)
#
# .whl/ is git-ignored, so it does NOT travel with the working tree: the device tool sends it only when the call
# names it in `carry` (carry: [".whl"]). Without it this script stops at once and says so.
#
# 1. checks that .whl/ holds every wheel fetch_wheels.sh lists, installs them into /tmp/site in front of the image's
#    packages, and puts this checkout on PYTHONPATH (no build, no network);
# 2. gpu_proof.py: first the environment check (proof_env.py: versions into env.txt, requirements, imports, torch's
#    CUDA, bitsandbytes' CUDA library); anything wrong stops the script there with one line (exit 3), before any
#    model is built. Then the headline comparison (EMOTrainer vs SFTTrainer on the largest-vocabulary 7-8B shape at
#    the headline batch), the other configurations while time allows, and the merge check in time kept back for it
#    (--merge-reserve); $OUT/gpu_results.{json,md} are written after every run;
# 3. the GPU tests (pytest -m gpu on every test file that has some; skipped in a --dry-run unless DRY_RUN_TESTS=1);
# 4. prints the results table last.
# Budget: under 8 minutes in all (wheels ~30 s, proof 300 s + 30 s kill margin, tests 100 s).
# SKIP_WHEELS=1 skips step 1 (where the packages are installed already); PYTHON picks the interpreter (python3);
# WHEEL_DIR replaces .whl.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-outputs/gpu_proof}
PY=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-.whl}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
    TOKENIZERS_PARALLELISM=false WANDB_DISABLED=true
PROOF_BUDGET=${PROOF_BUDGET:-300}  # seconds gpu_proof.py plans for (--time-budget); killed 30 s after
TEST_LIMIT=${TEST_LIMIT:-100}
start=$(date +%s)
stamp() { echo "[$(date +%H:%M:%S) +$(($(date +%s) - start))s] $*"; }

if [ "${SKIP_WHEELS:-0}" != 1 ]; then
    # The packages fetch_wheels.sh downloads, read from its WHEELS list (one place for the names).
    needed=$(sed -n '/^WHEELS=(/,/^)/p' benchmarks/gpu/fetch_wheels.sh | grep -o '^ *[A-Za-z0-9_.-]*==' | tr -d ' =')
    missing=""
    for name in $needed; do
        ls "$WHEEL_DIR/$(echo "$name" | tr '-' '_')"-*.whl >/dev/null 2>&1 || missing="$missing $name"
    done
    if [ -n "$missing" ]; then
        echo "error: $WHEEL_DIR/ lacks the wheels of:$missing. .whl/ is git-ignored, so it reaches the GPU" \
            "machine only when the device call names it in carry (carry: [\".whl\"]); fill it with" \
            "benchmarks/gpu/fetch_wheels.sh where there is network, or set SKIP_WHEELS=1 where the packages are" \
            "installed." >&2
        exit 2
    fi
    stamp "installing the carried wheels: $(ls "$WHEEL_DIR"/*.whl | xargs -n1 basename | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEEL_DIR"/*.whl && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
mkdir -p "$OUT"

stamp "environment" | tee "$OUT/env.txt"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    git rev-parse HEAD 2>/dev/null || echo "git: no repository here"
} 2>&1 | tee -a "$OUT/env.txt"

# gpu_proof.py checks the environment first (versions, imports, CUDA, bitsandbytes; appended to env.txt) and exits 3
# with one line, before any model is built, when something is wrong: then nothing else runs.
stamp "gpu_proof.py (budget ${PROOF_BUDGET}s)"
timeout -k 10 "$((PROOF_BUDGET + 30))" "$PY" benchmarks/gpu/gpu_proof.py --out "$OUT" --time-budget "$PROOF_BUDGET" \
    "$@" 2>&1 | tee "$OUT/gpu_proof.log"
proof_rc=${PIPESTATUS[0]}
if [ "$proof_rc" = 3 ]; then
    stamp "stopped: $(grep 'environment check FAILED' "$OUT/env.txt" | tail -n 1)"
    exit 3
fi
stamp "gpu_proof.py exit code $proof_rc (124 = stopped at the time limit; results so far are in $OUT)"

# Only the test files that hold GPU tests are collected: the others may import what the GPU image lacks (POT, ...).
# A dry run skips them (on a CPU they all skip; tests/gpu/test_device_image.py checks they collect on the image).
gpu_tests=$(grep -rlE --include='test_*.py' 'pytest\.mark\.gpu\b' tests | sort | tr '\n' ' ')
case " $* " in
*" --dry-run "*) test_mode=${DRY_RUN_TESTS:-skip} ;;
*) test_mode=run ;;
esac
if [ "$test_mode" = skip ]; then
    stamp "dry run: the GPU tests are not run (DRY_RUN_TESTS=1 runs them)" | tee "$OUT/pytest_gpu.log"
    test_rc=0
else
    stamp "pytest -m gpu $gpu_tests(limit ${TEST_LIMIT}s)"
    # shellcheck disable=SC2086
    timeout -k 10 "$TEST_LIMIT" "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
        $gpu_tests 2>&1 | tee "$OUT/pytest_gpu.log"
    test_rc=${PIPESTATUS[0]}
    stamp "pytest exit code $test_rc"
fi

echo
tail -n 3 "$OUT/pytest_gpu.log"
echo
cat "$OUT/gpu_results.md" 2>/dev/null || echo "no results table was written"
stamp "total $(($(date +%s) - start))s; proof rc $proof_rc, tests rc $test_rc"
[ "$proof_rc" = 0 ] && [ "$test_rc" = 0 ]
