#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has no network): Liger-Kernel as a contender, matplotlib for the
# charts. Run here before a GPU session; pass carry: [".whl"] to the device run, where
# benchmarks/gpu_check.sh installs them into /tmp/site. .whl/ is ignored by git (.git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
  liger-kernel==0.8.5 matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1 fonttools==4.68.0 \
  kiwisolver==1.5.1 pillow==13.0.0 pyparsing==3.3.3 python-dateutil==4.0.0 six==1.17.0
ls -la .whl
