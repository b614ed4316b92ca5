#!/usr/bin/env bash
# The one GPU run (see shared/BENCHMARKING.md): environment report, install against the machine's
# own torch/triton, the gpu-marked tests, then the kernel self-check on the card.
# The op and train-step benchmarks join this script with the benchmark suite.
#   OUT=/some/dir bash benchmarks/gpu_check.sh     (OUT defaults to benchmarks/results/local)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/local}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  echo "== environment"
  nvidia-smi || true
  python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  if [ -d .whl ]; then
    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  fi
  echo "== install"
  MAX_JOBS=16 pip install -q --no-deps --no-build-isolation -e . || exit 1
  echo "== gpu tests"
  python -m pytest -m gpu -x -q -p no:cacheprovider tests
  tests_rc=$?
  echo "== self-check on the GPU"
  python -m solar_kernels.selfcheck --device cuda
  selfcheck_rc=$?
  echo "== summary: gpu tests rc=$tests_rc, self-check rc=$selfcheck_rc"
  [ "$tests_rc" -eq 0 ] && [ "$selfcheck_rc" -eq 0 ]
} 2>&1 | tee "$OUT/log"
