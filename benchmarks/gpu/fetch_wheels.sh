#!/usr/bin/env bash
# Download, into <repo>/.whl (git-ignored), the wheels that the GPU machine's image lacks or has in a version too old
# for emo_calibrate, for CPython 3.12 on manylinux x86_64. The GPU machine has no network: run_gpu_proof.sh installs
# exactly these files with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl`. Being git-ignored, .whl/
# reaches the GPU machine only when the device call names it in `carry` (carry: [".whl"]); run_gpu_proof.sh reads
# the WHEELS list below and stops at once, saying so, when one of them is missing.
#
# What the image has (/work/.library/device/KINDS.md, read 2026-11): torch 2.11.0+cu130, transformers 5.17.0,
# accelerate 1.15.0, huggingface_hub 1.33.0, tokenizers 0.23.2, safetensors 0.8.0, numpy, pandas, pyarrow, xxhash,
# fsspec, psutil, jinja2, pyyaml, regex, typer, tqdm; peft of unknown version; no trl, bitsandbytes, datasets, dill,
# multiprocess. Requirements were walked with `unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist`:
#   transformers 5.24.0: huggingface-hub>=1.31,<3 (image 1.33.0: ok), tokenizers>=0.23.1,<0.24 (0.23.2: ok),
#                        safetensors>=0.8.0 (0.8.0: ok), regex>=2025.10.22 (checked at import time by transformers;
#                        image version unknown, so carried)
#   trl 1.16.0:          accelerate>=1.10.1, datasets>=4.7, pandas, psutil, pyarrow>=21, jinja2 (image: ok)
#   datasets 5.2.0:      dill<0.4.2 and multiprocess<0.70.20 (missing: carried), fsspec<=2026.9.0 (image version
#                        unknown, so pinned and carried), xxhash, pyarrow>=24 (image, version unknown, 40+ MB: not
#                        carried, it would not fit the 64 MiB carry limit beside these; the proof's environment check
#                        (proof_env.py) stops with one line in its first seconds if the image's pyarrow is older)
#   bitsandbytes 0.50.2: torch>=2.4, numpy, packaging (image: ok)
#   peft 0.21.2:         carried so the version is the one we test against on CPU
# Keep one version of each package here: two versions of one package stop the whole install.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
DEST=.whl

WHEELS=(
    transformers==5.24.0
    trl==1.16.0
    peft==0.21.2
    bitsandbytes==0.50.2
    datasets==5.2.0
    dill==0.4.1
    multiprocess==0.70.19
    fsspec==2026.9.0
    regex==2026.11.19
)

mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" "${WHEELS[@]}"

# bitsandbytes ships one native library per CUDA/ROCm/XPU version (41 MiB); the image's torch is built for CUDA 13.0,
# and bitsandbytes picks libbitsandbytes_cuda<torch.version.cuda>.so. Keep only the CUDA 13.x and CPU libraries so the
# carried tree stays far under the 64 MiB limit (FULL_BNB=1 keeps the original wheel). The kept files are unchanged.
if [ "${FULL_BNB:-0}" != 1 ]; then
    "$PY" - "$DEST"/bitsandbytes-*.whl <<'PYEOF'
import os, re, sys, zipfile

path = sys.argv[1]
drop = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[12]\d|rocm\d+|xpu\d+)\.so$")
with zipfile.ZipFile(path) as src:
    names = src.namelist()
    if not any(drop.search(n) for n in names):
        sys.exit(0)  # already slimmed
    if not any(n.endswith("libbitsandbytes_cuda130.so") for n in names):
        sys.exit(f"{path} has no CUDA 13.0 library: refusing to slim it")
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            if drop.search(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not drop.search(line.split(",")[0])).encode()
            out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
os.replace(tmp, path)
PYEOF
fi

# Exactly one wheel per package (an older file left in .whl would break the install on the device).
dupes=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
    echo "error: several wheels of: $dupes in $DEST; delete the older ones" >&2
    exit 1
fi
ls -l "$DEST"/*.whl | awk '{printf "%8.1f MiB  %s\n", $5 / 1048576, $NF}'
du -cb "$DEST"/*.whl | tail -1 | awk '{printf "total: %.1f MiB\n", $1 / 1048576}'
