#!/usr/bin/env bash
# The one GPU run (shared/BENCHMARKING.md): environment, install against the machine's own torch,
# the gpu-marked tests, the op benchmarks (bf16, SOLAR shapes), the train-step benchmark, and the
# combined results. Everything lands in $OUT (default benchmarks/results/local); afterwards, on the
# development machine: python -m benchmarks.report --into benchmarks/results --readme README.md
# (after copying $OUT/<date>-<card>.{json,csv} into benchmarks/results/).
#   OUT=/some/dir bash benchmarks/gpu_check.sh        at most ~9.5 minutes on an H100/H200 (every step has a
#   timeout; the op benchmarks stop starting new cases after 130 s); SKIP_SANITIZER=1 drops compute-sanitizer
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/local}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
step() { echo; echo "== $1 ($(date +%T))"; }
{
  step "environment"
  nvidia-smi || true
  python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  if compgen -G ".whl/*.whl" > /dev/null; then  # pure-Python contenders (liger-kernel) brought as wheels
    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  fi
  step "install"
  MAX_JOBS=16 pip install -q --no-deps --no-build-isolation -e . || exit 1
  step "gpu tests"
  timeout 200 python -m pytest -m gpu -x -q -p no:cacheprovider tests || status=1
  if [ -z "${SKIP_SANITIZER:-}" ] && command -v compute-sanitizer > /dev/null; then
    step "compute-sanitizer (small case of every CUDA op)"
    timeout 90 compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/cuda_sanitize.py || status=1
  fi
  step "op benchmarks"
  timeout 200 python -m benchmarks.ops --out "$OUT" --budget-s 130 || status=1
  step "train-step benchmark"
  timeout 100 python -m benchmarks.train_step --out "$OUT" --steps 3 || status=1
  step "results"
  python -m benchmarks.report "$OUT" --into "$OUT" || status=1
  echo "== done: status $status"
  exit $status
} 2>&1 | tee "$OUT/log"
