"""The GPU proof's one command (benchmarks/gpu/run_gpu_proof.sh) in its CPU dry run, so that it keeps working between
GPU runs: the argument handling, the environment check, both trainers, the merge check, the result files and the
report table, on a tiny 4-bit model."""

import json
import math
import os
import subprocess
import sys
import time

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu", "run_gpu_proof.sh")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "SKIP_WHEELS", "WHEEL_DIR", "DRY_RUN_TESTS")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHON=sys.executable, **extra)
    return env


def _tiny_parameters(shape="tiny"):
    """The unquantised parameter count of a proof shape (a meta-device skeleton: no memory)."""
    import torch
    from transformers import LlamaForCausalLM

    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "gpu"))
    from proof_setup import llama_config

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(llama_config(shape)).parameters())


def test_dry_run_of_the_proof_script(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", SCRIPT, "--dry-run", "--work-dir", str(tmp_path / "work")],
        cwd=ROOT, env=_env(SKIP_WHEELS="1", OUT=str(out)), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]

    results = json.loads((out / "gpu_results.json").read_text())
    assert results["verdict"] == "passed" and results["base"].startswith("4-bit NF4")
    # The model's own count: the 4-bit storage holds two weights per byte (item 3).
    assert results["models"]["tiny"]["parameters"] == _tiny_parameters()
    runs = results["runs"]
    assert [(r["model"], r["batch_size"], r["trainer"], r["pair"], r["order"]) for r in runs] == [
        ("tiny", 2, "mle", 0, 1),
        ("tiny", 2, "emo", 0, 2),
    ]
    for run in runs:
        assert run["status"] == "ok", run
        assert len(run["step_times_s"]) == 1 + 2  # warm-up + timed steps
        assert run["median_step_s"] > 0 and math.isclose(run["tokens_per_s"], 2 * 64 / run["median_step_s"])
        assert math.isfinite(run["last_log"]["loss"])
    mle, emo = runs
    # Read after training: the fused head ran, and its workspace at this shape is stated (items 2 and 8).
    assert emo["emo_fused_head"] is True and emo["emo_fallback_reason"] is None
    assert emo["emo_workspace_gib"] == pytest.approx(2 * 4 * (2 * 63) * 512 / 2**30)  # 126 tokens < the CPU floor
    assert "emo" in emo["last_log"] and "emo" not in mle["last_log"]
    assert math.isclose(emo["last_log"]["loss"], emo["last_log"]["mle"], rel_tol=1e-3)  # mle_anchored (default): = mle
    # Same batches, and at step 1 the adapters are still zero: TRL's cross-entropy equals EMOTrainer's logged mle.
    assert math.isclose(mle["first_log"]["loss"], emo["first_log"]["mle"], rel_tol=1e-4)
    (comparison,) = results["comparisons"]
    assert comparison["first"] == "mle"
    assert math.isclose(comparison["median_step_s_ratio"], emo["median_step_s"] / mle["median_step_s"])

    merge = results["merge"]
    assert merge["status"] == "ok", merge
    parity = merge["parity"]
    assert parity["passed"] and all(parity["checks"].values()), parity
    assert parity["mean_kl"] <= 0.01 * parity["adapter_kl"] and parity["adapter_kl"] >= 1e-3

    assert "environment check passed (cpu)" in (out / "env.txt").read_text()
    assert "dry run: the GPU tests are not run" in (out / "pytest_gpu.log").read_text()
    table = (out / "gpu_results.md").read_text()
    header = "| # | model | batch | trainer | status | resident | peak | above resident | reserved | EMO workspace"
    assert header in table
    assert "| 1 | tiny | 2 | mle | ok |" in table and "| 2 | tiny | 2 | emo | ok |" in table
    assert "Merge check (tiny-tied" in table and "Failed criteria: none." in table
    assert table.rstrip().endswith("Verdict: passed")
    assert proc.stdout.rstrip().splitlines()[-1].endswith("proof rc 0, tests rc 0")


def test_missing_wheels_stop_the_script_at_once(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run(
        ["bash", SCRIPT], cwd=ROOT, env=_env(WHEEL_DIR=str(tmp_path / "no-wheels"), OUT=str(tmp_path / "out")),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert time.perf_counter() - start < 10  # before any Python starts
    message = proc.stderr
    assert "git-ignored" in message and "carry" in message and "SKIP_WHEELS=1" in message
    for package in ("transformers", "trl", "peft", "bitsandbytes", "datasets"):  # read from fetch_wheels.sh
        assert f" {package}" in message.split("lacks the wheels of:")[1].split(".")[0]
    assert not (tmp_path / "out").exists()
