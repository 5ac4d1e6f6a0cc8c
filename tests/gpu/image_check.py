"""Run with the GPU image's packages only (see image_site.py): what the GPU tests need must be there.

    python -S tests/gpu/image_check.py WORK_DIR      # PYTHONPATH=<image-only site>:<checkout>:<checkout>/tests

Prints one JSON line: `collect` (pytest's exit code collecting `-m gpu` in every test file that has GPU tests, as
run_gpu_proof.sh does), `imports` (each module a GPU test imports in its body, and the error if it fails),
`evaluation` (the CPU half of tests/evaluation/test_evaluation.py::test_run_evaluation_on_cuda with its settings, or
the error), `evaluation_with_mauve` (the same with MAUVE on, as that test had it: it must fail here, which shows that
the packages outside the image are really hidden), `proof_environment` (what the GPU proof's environment check finds
wrong here: its requirements and imports, minus CUDA). Each GPU test file's module-level imports are checked by the collection.
"""

import ast
import contextlib
import glob
import importlib
import importlib.util
import io
import json
import os
import re
import sys
import tempfile


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MARK = re.compile(r"pytest\.mark\.gpu\b")


def gpu_test_files() -> list[str]:
    """The files run_gpu_proof.sh hands to `pytest -m gpu` (the same pattern)."""
    files = glob.glob(os.path.join(ROOT, "tests", "**", "test_*.py"), recursive=True)
    return sorted(f for f in files if MARK.search(open(f).read()))


def _is_gpu_test(node, module_marked: bool) -> bool:
    marks = [ast.unparse(d) for d in getattr(node, "decorator_list", [])]
    return module_marked or any(MARK.search(m) for m in marks)


def body_imports(path: str) -> set[str]:
    """Modules imported inside the GPU tests of `path` (pytest.importorskip'd ones skip cleanly: left out)."""
    tree = ast.parse(open(path).read())
    module_marked = any(
        isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in n.targets)
        and MARK.search(ast.unparse(n.value)) for n in tree.body
    )  # fmt: skip
    modules = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test") and _is_gpu_test(node, module_marked):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    modules.update(alias.name for alias in inner.names)
                elif isinstance(inner, ast.ImportFrom) and inner.level == 0:
                    modules.update(f"{inner.module}.{alias.name}" for alias in inner.names)
    return modules


def _import(name: str) -> str | None:
    """None if `name` imports (as a module, or as an attribute of its parent module), else the error."""
    try:
        importlib.import_module(name)
        return None
    except ImportError as error:
        parent, _, attribute = name.rpartition(".")
        try:
            if parent and hasattr(importlib.import_module(parent), attribute):
                return None
        except ImportError:
            pass
        return f"{type(error).__name__}: {error}"


def evaluation_on_cpu(work: str, featurizer: str | None = "none") -> dict:
    """run_evaluation on the CPU with the settings of the GPU evaluation test (its fixture rebuilt here); a
    `featurizer` of None keeps `_tiny_eval_settings`' own (the tiny model: MAUVE on)."""
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from tiny_models import SENTENCES, build_tiny_model_dir
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, os.path.join(ROOT, "tests", "evaluation"))
    from test_evaluation import _tiny_eval_settings

    from emo_calibrate.evaluation.arguments import EvalArguments
    from emo_calibrate.evaluation.runner import run_evaluation

    work = tempfile.mkdtemp(dir=work)
    model_dir = build_tiny_model_dir(os.path.join(work, "tiny"), arch="llama")
    assets = os.path.join(work, "assets")
    os.makedirs(assets)
    rng = random.Random(0)
    with open(os.path.join(assets, "held.jsonl"), "w") as f:
        for _ in range(3):  # as the eval_assets fixture writes them
            paragraphs = [" ".join(rng.choice(SENTENCES) for _ in range(8)) for _ in range(2)]
            f.write(json.dumps({"text": "\n".join(paragraphs)}) + "\n")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(os.path.join(assets, "emo-adapter"))
    settings = {**_tiny_eval_settings(model_dir, _Path(assets)), "seeds": [0]}
    if featurizer is not None:
        settings["featurizer"] = featurizer
    results = run_evaluation(EvalArguments(**settings, decoding=["greedy"], device="cpu", output_dir=work + "/out"))
    return {"models": len(results["models"]), "featurizer": results.get("featurizer")}


class _Path(str):
    """`assets / "name"` as the fixture's pathlib folder allows, on a plain string."""

    def __truediv__(self, name):
        return os.path.join(self, name)


def main(work: str) -> None:
    import pytest

    files = gpu_test_files()
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        collect = pytest.main(["--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files])
    imports = {name: _import(name) for path in files for name in sorted(body_imports(path))}
    evaluation = {}
    for name, featurizer in (("evaluation", "none"), ("evaluation_with_mauve", None)):
        try:
            evaluation[name] = evaluation_on_cpu(work, featurizer)
        except Exception as error:  # noqa: BLE001 - reported to the test
            evaluation[name] = {"error": f"{type(error).__name__}: {error}"}
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "gpu"))
    import proof_env

    evaluation["proof_environment"] = proof_env.check_environment("cpu")  # the proof's own imports and requirements
    hidden = sorted(m for m in ("mauve", "faiss", "ot", "lm_eval") if importlib.util.find_spec(m) is not None)
    report = {"files": [os.path.relpath(f, ROOT) for f in files], "collect": int(collect), "imports": imports}
    report.update(evaluation, visible_non_image_modules=hidden, collect_log=quiet.getvalue()[-3000:])
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
