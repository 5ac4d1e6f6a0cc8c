"""What Python packages the lent GPU machine has: its image's packages plus the wheels the proof carries.

The GPU tests (`pytest -m gpu`, run by run_gpu_proof.sh) must import nothing else, or skip with the reason; the CPU
tests in tests/gpu/test_device_image.py check that against this list with every other installed package hidden.

`IMAGE_PACKAGES` is the list of the device tool's KINDS.md ("Python packages already there", read on a machine
running the 'cuda' image on 2026-11-17), for the kinds nvidia-h100-x1 and nvidia-h200; versions were not listed
there (torch 2.11.0, transformers 5.17.0, accelerate 1.15.0, huggingface_hub 1.33.0, tokenizers 0.23.2, safetensors
0.8.0 were seen). Update it when that list changes.
"""

import os
import re


__all__ = ["IMAGE_PACKAGES", "allowed_distributions", "carried_packages", "normalize"]

IMAGE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()

FETCH_WHEELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fetch_wheels.sh")


def normalize(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def carried_packages(path: str = FETCH_WHEELS) -> list[str]:
    """The packages of the `WHEELS=(...)` list of fetch_wheels.sh: what the proof carries in .whl/."""
    with open(path) as handle:
        text = handle.read()
    block = re.search(r"^WHEELS=\((.*?)^\)", text, flags=re.S | re.M)
    if block is None:
        raise ValueError(f"no WHEELS=( ... ) list in {path}")
    return re.findall(r"^\s*([A-Za-z0-9_.-]+)==", block.group(1), flags=re.M)


def allowed_distributions() -> set[str]:
    """Normalised names of every distribution the GPU machine has once the carried wheels are installed."""
    return {normalize(name) for name in (*IMAGE_PACKAGES, *carried_packages())}
