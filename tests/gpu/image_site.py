"""A view of this environment's site-packages that holds only what the GPU machine would have.

`image_only_site(folder)` fills `folder` with links to the entries of site-packages that belong to the distributions
of `benchmarks/gpu/device_image.py` (the GPU image's packages and the carried wheels), and to files no distribution
claims; everything else (mauve-text, faiss, POT, lm-eval, ... and emo_calibrate's own install) is left out. A Python
started with `-S` (no site-packages) and `PYTHONPATH=folder:<checkout>` then finds only those, as the GPU machine's
python3 does with the checkout on PYTHONPATH.
"""

import importlib.metadata as metadata
import os
import sys
import sysconfig


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _device_image():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "gpu"))
    try:
        import device_image
    finally:
        sys.path.pop(0)
    return device_image


def _with_requirements(names: set[str], site: str, normalize) -> set[str]:
    """`names` and everything they require here, transitively: the versions installed here may need more than the
    image's (huggingface_hub 2.x needs httpx2, 1.33 did not), and that is no fault of the code under test."""
    declared = {}
    for dist in metadata.distributions(path=[site]):
        declared[normalize(dist.metadata["Name"])] = dist.requires or []
    from packaging.requirements import Requirement

    todo, seen = list(names), set(names)
    while todo:
        for text in declared.get(todo.pop(), []):
            requirement = Requirement(text)
            name = normalize(requirement.name)
            if name not in seen and (requirement.marker is None or requirement.marker.evaluate({"extra": ""})):
                seen.add(name)
                todo.append(name)
    return seen


def image_only_site(folder) -> dict:
    """Link the allowed entries of site-packages into `folder`.

    Returns:
        `dict`: `hidden`, the distributions left out (normalised names), and `env`, the environment variables for a
        subprocess started as `[sys.executable, "-S", ...]`.
    """
    device_image = _device_image()
    site = sysconfig.get_paths()["purelib"]
    allowed = _with_requirements(device_image.allowed_distributions(), site, device_image.normalize)
    owners = {}  # top-level entry of site-packages -> the distributions that install files under it
    for dist in metadata.distributions(path=[site]):
        name = device_image.normalize(dist.metadata["Name"])
        # RECORD lists the .dist-info folder's own files too, so it is among the tops.
        tops = {str(f).split("/")[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            owners.setdefault(top, set()).add(name)
    os.makedirs(folder, exist_ok=True)
    hidden = set()
    for entry in os.listdir(site):
        names = owners.get(entry)
        if entry.endswith(".pth"):  # processed by site only, which -S leaves out
            continue
        if names and not names & allowed:
            hidden |= names
            continue
        os.symlink(os.path.join(site, entry), os.path.join(folder, entry))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "OUT"))}
    env.update(PYTHONPATH=os.pathsep.join([str(folder), ROOT, os.path.join(ROOT, "tests")]), PYTHONUNBUFFERED="1")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return {"hidden": sorted(hidden), "env": env}
