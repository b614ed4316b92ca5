#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has no network): only Liger-Kernel, as a contender (pure Python;
# 0.8.5 imports with the image's triton 3.6). matplotlib and the rest are on the image already
# (/work/.library/device/KINDS.md). Run here before a GPU session; pass carry: [".whl"] to the device
# run, where benchmarks/gpu_check.sh installs them into /tmp/site. .whl/ is ignored by git
# (.git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl liger-kernel==0.8.5
ls -la .whl
