"""The GPU proof script (benchmarks/gpu) in its CPU dry-run mode, so that it keeps working between GPU runs."""

import json
import math
import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu", "gpu_proof.py")


def test_dry_run_trains_both_trainers_merges_and_writes_the_tables(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--dry-run", "--out", str(out), "--work-dir", str(tmp_path / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((out / "gpu_results.json").read_text())
    runs = {(r["model"], r["batch_size"], r["trainer"]): r for r in results["runs"]}
    assert set(runs) == {("tiny", 2, "mle"), ("tiny", 2, "emo")}
    for run in runs.values():
        assert run["status"] == "ok", run
        assert len(run["step_times_s"]) == 1 + 2  # warm-up + timed steps
        assert run["median_step_s"] > 0 and math.isclose(run["tokens_per_s"], 2 * 64 / run["median_step_s"])
        assert math.isfinite(run["last_log"]["loss"])
    # The EMO run went through EMOTrainer's fused head and logged its terms; the MLE run is plain SFTTrainer.
    emo, mle = runs["tiny", 2, "emo"], runs["tiny", 2, "mle"]
    assert emo["emo_fused_head"] is True and "emo" in emo["last_log"] and "emo" not in mle["last_log"]
    assert math.isclose(emo["last_log"]["loss"], 2 * emo["last_log"]["emo"], rel_tol=1e-3)  # emo_anchored: 2*emo
    # Same batches, and at step 1 the adapters are still zero: TRL's cross-entropy equals EMOTrainer's logged mle.
    assert math.isclose(mle["first_log"]["loss"], emo["first_log"]["mle"], rel_tol=1e-4)

    (comparison,) = results["comparisons"]
    assert math.isclose(comparison["median_step_s_ratio"], emo["median_step_s"] / mle["median_step_s"])
    merge = results["merge"]
    assert merge["status"] == "ok", merge
    parity = merge["parity"]
    assert parity["passed"] and parity["max_abs_prob_diff"] <= 1e-2
    assert parity["max_abs_logit_diff"] < 0.25 * parity["adapter_effect_logits"]

    table = (out / "gpu_results.md").read_text()
    assert "| tiny | 2 | mle | ok |" in table and "| tiny | 2 | emo | ok |" in table
    assert "Merge check (tiny-tied" in table
