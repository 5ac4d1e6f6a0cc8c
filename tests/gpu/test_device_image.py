"""The GPU tests must need only what the GPU machine has: its image's packages and the wheels the proof carries
(benchmarks/gpu/device_image.py). Checked here, on a CPU, with every other installed package hidden (image_site.py):
their files collect, what their bodies import imports, the evaluation they run works, and so does the GPU proof's
own environment check (tests/gpu/image_check.py)."""

import json
import os
import subprocess
import sys

from image_site import ROOT, image_only_site


CHECK = os.path.join(ROOT, "tests", "gpu", "image_check.py")


def test_carried_wheels_are_read_from_fetch_wheels():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "gpu"))
    from device_image import IMAGE_PACKAGES, carried_packages

    carried = carried_packages()
    assert {"transformers", "trl", "peft", "bitsandbytes", "datasets"} <= set(carried)
    assert len(carried) == len(set(carried))  # one version of each: two stop the install on the device
    assert "mauve-text" not in IMAGE_PACKAGES and "faiss-cpu" not in IMAGE_PACKAGES and "pyarrow" in IMAGE_PACKAGES


def test_gpu_tests_need_only_the_image_and_the_carried_wheels(tmp_path):
    site = image_only_site(tmp_path / "site")
    assert {"mauve-text", "faiss-cpu", "pot", "lm-eval", "emo-calibrate"} <= set(site["hidden"])
    (tmp_path / "work").mkdir()
    proc = subprocess.run(
        [sys.executable, "-S", CHECK, str(tmp_path / "work")],
        cwd=ROOT, env=site["env"], capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["visible_non_image_modules"] == []
    assert {"tests/evaluation/test_evaluation.py", "tests/gpu/test_qlora_gpu.py"} <= set(report["files"])
    assert report["collect"] == 0, report["collect_log"]
    assert report["imports"] and not {name: error for name, error in report["imports"].items() if error}
    assert report["evaluation"] == {"models": 2, "featurizer": None}, report["evaluation"]
    assert report["proof_environment"] == []  # the proof itself needs nothing else either
    # With MAUVE on, as the GPU evaluation test had it, the same run needs mauve-text: the check can fail.
    assert "No module named 'mauve'" in report["evaluation_with_mauve"].get("error", ""), report
