"""The GPU proof's environment check: in its first seconds, before any model is built, say in one line what is wrong.

Checked, in this order (each later check needs the earlier ones):

1. versions, read from the installed packages' metadata without importing them: the proof's own pins (emo_calibrate's
   `pyproject.toml`: torch, transformers, trl, peft, bitsandbytes, datasets, accelerate) and every requirement that
   the carried packages (fetch_wheels.sh's list: transformers, trl, peft, bitsandbytes, datasets, ...) declare, since
   they are dropped into an image that was not built for them (so an image's pyarrow older than `datasets` needs is
   named here, not at the first batch); the image's own packages (torch, accelerate) are taken as they are;
2. the imports the proof makes (a broken install fails here with its own error);
3. on CUDA: a CUDA build of torch that sees a GPU, and bitsandbytes with its CUDA library loaded and a working NF4
   round trip on the GPU.

gpu_proof.py runs it first (`environment_gate`); on its own:

    python benchmarks/gpu/proof_env.py [gpu_proof.py options]   # prints the versions; exit 3 and one line if wrong
"""

import importlib
import importlib.metadata as metadata
import importlib.util
import os
import re
import sys


__all__ = ["ENV_ERROR_EXIT", "check_environment", "environment_gate", "requirement_problems", "version_report"]

ENV_ERROR_EXIT = 3  # gpu_proof.py and run_gpu_proof.sh stop with this code when the check fails

# The packages pinned by pyproject.toml that the proof needs.
KEY_PACKAGES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate")
# What the proof imports, by module name (emo_calibrate's and trl's top levels are lazy: the modules that do the work
# are named); emo_calibrate comes from PYTHONPATH (the checkout), not from an install.
IMPORTS = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate", "emo_calibrate.training.trainer",
           "emo_calibrate.export.merge")  # fmt: skip
REPORTED = (*KEY_PACKAGES, "huggingface_hub", "tokenizers", "safetensors", "pyarrow", "fsspec", "dill", "multiprocess",
            "regex", "numpy", "pandas", "pytest")  # fmt: skip
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _declared_requirements(name: str) -> list[str]:
    try:
        return metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return []


def project_pins(path: str = os.path.join(ROOT, "pyproject.toml")) -> list[str]:
    """emo_calibrate's own requirements on the key packages (the checkout is not installed on the GPU machine)."""
    import tomllib

    with open(path, "rb") as handle:
        dependencies = tomllib.load(handle)["project"]["dependencies"]
    wanted = {_normalize(name) for name in KEY_PACKAGES}
    return [d for d in dependencies if _normalize(re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0]) in wanted]


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def carried_packages() -> list[str]:
    from device_image import carried_packages as carried

    return carried()


def requirement_problems(pins, packages=None, version_of=_installed_version, requires_of=_declared_requirements):
    """What is missing or at a wrong version, one phrase each (empty when all is well).

    Args:
        pins (`list[str]`): requirement strings of the proof itself (`"transformers>=5.24,<6"`).
        packages (`list[str]`, *optional*): installed packages whose declared requirements (one level: not what those
            declare in turn) are checked too; default: the carried packages.
        version_of (`Callable[[str], str | None]`): the installed version of a distribution, `None` if absent.
        requires_of (`Callable[[str], list[str]]`): the requirement strings a distribution declares.
    """
    from packaging.requirements import Requirement

    checks = [(Requirement(pin), "emo_calibrate") for pin in pins]
    for package in carried_packages() if packages is None else packages:
        owner = f"{package} {version_of(package)}"
        for text in requires_of(package) if version_of(package) else []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                checks.append((requirement, owner))
    problems = []
    for requirement, owner in checks:
        installed = version_of(requirement.name)
        if installed is None:
            problems.append(f"{requirement.name} is not installed ({owner} requires {requirement})")
        elif not requirement.specifier.contains(installed, prereleases=True):
            problems.append(f"{requirement.name} {installed} is installed, {owner} requires {requirement}")
    return list(dict.fromkeys(problems))


def _bitsandbytes_cuda_problem() -> str | None:
    import bitsandbytes
    import bitsandbytes.cextension as cextension
    from proof_checks import bitsandbytes_problem

    library = getattr(cextension, "lib", None)
    cuda_library = getattr(cextension, "CudaBNBNativeLibrary", None)
    if cuda_library is not None and not isinstance(library, cuda_library):
        found = sorted(os.path.basename(p) for p in os.listdir(os.path.dirname(cextension.__file__)) if ".so" in p)
        mock = getattr(cextension, "ErrorHandlerMockBNBNativeLibrary", None)  # holds the load error, if any
        error = str(library.error_msg).strip().splitlines() if mock and isinstance(library, mock) else []
        return (
            f"bitsandbytes {bitsandbytes.__version__} loaded no CUDA library for torch's CUDA {_torch_cuda()}"
            f"{': ' + error[0] if error else ''} (its folder holds {', '.join(found) or 'no library'})"
        )
    problem = bitsandbytes_problem("cuda")
    return None if problem is None else f"bitsandbytes' NF4 round trip on the GPU failed: {problem}"


def _torch_cuda() -> str | None:
    import torch

    return torch.version.cuda


def check_environment(device: str, quantize: bool = True, ignore_versions: bool = False) -> list[str]:
    """Everything that would stop the proof on `device` ("cuda" or "cpu"), one phrase each; empty when all is well.

    Version problems stop the check before any import (importing a package whose requirements are not met can fail
    in ways that hide the cause), unless `ignore_versions`: then they are left to the caller to print.
    """
    problems = requirement_problems(project_pins())
    if problems and not ignore_versions:
        return problems
    for module in IMPORTS:
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - any import failure is the answer
            return [f"import {module} failed: {type(error).__name__}: {str(error).splitlines()[0]}"]
    if device != "cuda":
        return []
    import torch

    if torch.version.cuda is None:
        return [f"torch {torch.__version__} is a CPU build (torch.version.cuda is None)"]
    if not torch.cuda.is_available():
        return [f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"]
    problem = _bitsandbytes_cuda_problem() if quantize else None
    return [f"{problem} (--no-quantize measures on an unquantised base instead)"] if problem else []


def version_report() -> str:
    """One line per package: version and where it is imported from (what env.txt records)."""
    lines = [f"python {sys.version.split()[0]} ({sys.executable})"]
    for name in REPORTED:
        spec = importlib.util.find_spec(name.replace("-", "_"))
        origin = spec.origin if spec and spec.origin else "not importable"
        lines.append(f"{name} {_installed_version(name) or '-'} {origin}")
    return "\n".join(lines)


def environment_gate(args, device: str, report_path: str | None = None) -> bool:
    """Print (and append to `report_path`) the versions and the verdict; True when the proof may go on."""
    lines = [version_report()]
    if args.ignore_versions:
        lines += [f"warning (--ignore-versions): {p}" for p in requirement_problems(project_pins())]
    problems = check_environment(device, not args.no_quantize, args.ignore_versions)
    verdict = f"FAILED: {'; '.join(problems)}" if problems else f"passed ({device})"
    lines.append(f"environment check {verdict}")
    text = "\n".join(lines)
    print(text, flush=True)
    if report_path:
        with open(report_path, "a") as handle:
            handle.write(text + "\n")
    return not problems


def main(argv=None) -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(1, ROOT)
    from gpu_proof import parse_args, proof_device

    args = parse_args(argv)
    return 0 if environment_gate(args, proof_device(args)) else ENV_ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
