#!/usr/bin/env bash
# The one GPU run: it always brings numbers back. Hard budget of BUDGET_S seconds (default 540), the
# install included; every step runs under `timeout` with what is left of the budget, the most valuable
# first, and every benchmark writes its results after each case:
#   1 environment + ceilings (copy bandwidth, bf16 GEMM)       environment.json
#   2 install (CUDA extension for 9.0a; Triton-only if that build fails) install.log
#   3 Triton op benchmarks at 16K tokens (no width sweep)       ops.json
#   4 train step, 16K tokens: ours-triton and transformers first train_step.json
#   5 CUDA op benchmarks                                        ops_cuda.json
#   6 tests on the GPU (pytest -n 8 when pytest-xdist is there) tests.xml
#   7 compute-sanitizer, only with SANITIZE=1                   sanitize.log
#   8 the report, always, even after a timeout                  <date>-<card>.json
# Everything lands in $OUT (default benchmarks/results/local), with log and steps.tsv. Afterwards, on
# the development machine: copy $OUT/<date>-<card>.{json,csv} into benchmarks/results/ and run
#   python -m benchmarks.report --into benchmarks/results --readme README.md
# Wheels the image lacks (liger-kernel) come from .whl/ (benchmarks/fetch_wheels.sh; carry: [".whl"]).
# GPU_CHECK_REHEARSAL=1 runs every step on the CPU (tiny shapes, TRITON_INTERPRET=1, small budgets,
# the install as a pip dry run): what CI checks (tests/test_benchmarks.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/local}"
PY="${PY:-python3}"
BUDGET_S="${BUDGET_S:-540}"
mkdir -p "$OUT"
: > "$OUT/steps.tsv"
export PYTHONUNBUFFERED=1
# The copied tree may have no .git and the image no git: the commit travels in a file when it can.
if [ -z "${SOLAR_KERNELS_COMMIT:-}" ]; then
  SOLAR_KERNELS_COMMIT="$(git rev-parse --short HEAD 2>/dev/null || cat .commit 2>/dev/null || echo unknown)"
fi
export SOLAR_KERNELS_COMMIT
REHEARSAL="${GPU_CHECK_REHEARSAL:-}"
REPORT_RESERVE_S=20  # kept back for the report step

# step NAME LIMIT_S FILE COMMAND...: runs COMMAND under timeout (LIMIT_S, or what is left of the budget
# less the report's reserve), logs its status to steps.tsv. Returns COMMAND's status (124: timed out).
step() {
  local name="$1" limit="$2" file="$3"
  shift 3
  local left=$((BUDGET_S - SECONDS - REPORT_RESERVE_S))
  [ "$limit" -gt "$left" ] && limit="$left"
  echo
  echo "== $name ($(date +%T), ${SECONDS}s into the run, limit ${limit}s)"
  if [ "$limit" -lt 5 ]; then
    echo "skipped: the budget of ${BUDGET_S}s is spent"
    printf '%s\t%s\t%s\t%s\n' "$name" skipped 0 "$file" >> "$OUT/steps.tsv"
    return 124
  fi
  local start=$SECONDS status
  timeout --kill-after=5 "$limit" "$@"
  status=$?
  [ "$status" -eq 124 ] && echo "timed out after ${limit}s (what it wrote so far is kept)"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$file" >> "$OUT/steps.tsv"
  return "$status"
}

install() {
  if compgen -G ".whl/*.whl" > /dev/null; then  # pure-Python contenders the image lacks (liger-kernel)
    $PY -m pip install -q --no-index --disable-pip-version-check --no-deps --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  local pip=($PY -m pip install -q --no-index --disable-pip-version-check --no-deps --no-build-isolation)
  [ -n "$REHEARSAL" ] && pip+=(--dry-run)
  # Hopper only: one architecture halves the build. Its own timeout leaves the step time to fall back.
  if SOLAR_KERNELS_CUDA_ARCHS=9.0a MAX_JOBS=16 timeout "${CUDA_BUILD_S:-150}" "${pip[@]}" -e .; then
    echo "installed with the CUDA extension (sm_90a)"
    return 0
  fi
  echo "the CUDA extension did not build in time or failed (no Python headers for this python, say): installing Triton-only"
  SOLAR_KERNELS_SKIP_CUDA=1 "${pip[@]}" -e .
}

if [ -n "$REHEARSAL" ]; then
  export TRITON_INTERPRET=1
  CPU=(--cpu)
  OPS_ARGS=(--cpu --ops swiglu --no-sweep)
  TRAIN_ARGS=(--cpu --seq 16 --layers 1 --steps 1 --warmup 0 --ac none --contenders ours-triton hf)
  TESTS=(tests/ops/test_swiglu.py -m gpu)
  LIMIT_OPS=90 LIMIT_TRAIN=90 LIMIT_CUDA=60 LIMIT_TESTS=60 LIMIT_REPORT=60  # a shared CI CPU: imports alone take 5-20 s
else
  CPU=()
  OPS_ARGS=(--tokens 16384 --no-sweep --budget-s 100)
  # 4 x 4096 = 16K tokens, as the op benchmarks; the first contenders matter most
  TRAIN_ARGS=(--batch 4 --seq 4096 --layers 8 --steps 3 --warmup 1 --ac none selective full --packing unpacked packed
              --contenders ours-triton hf hf+liger ours-cuda hf+solar)
  TESTS=(tests/ops)
  LIMIT_OPS=130 LIMIT_TRAIN=100 LIMIT_CUDA=70 LIMIT_TESTS=90 LIMIT_REPORT=20
fi
export -f install
export PY REHEARSAL
if $PY -c "import xdist" 2> /dev/null; then
  TESTS+=(-n 8)
fi

{
  echo "gpu_check: budget ${BUDGET_S}s, out $OUT, commit $SOLAR_KERNELS_COMMIT${REHEARSAL:+, rehearsal on the CPU}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2> /dev/null || true
  step "environment + ceilings" 40 environment.json $PY -m benchmarks.common --out "$OUT" "${CPU[@]}"
  step "install" 200 install.log bash -c install > >(tee "$OUT/install.log") 2>&1
  [ -d /tmp/site ] && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  CEILINGS=()
  [ -s "$OUT/environment.json" ] && CEILINGS=(--ceilings-from "$OUT/environment.json")
  step "op benchmarks (Triton)" "$LIMIT_OPS" ops.json $PY -m benchmarks.ops "${OPS_ARGS[@]}" "${CEILINGS[@]}" \
    --contenders torch triton liger flash_attn --out "$OUT"
  step "train step" "$LIMIT_TRAIN" train_step.json $PY -m benchmarks.train_step "${TRAIN_ARGS[@]}" --out "$OUT"
  step "op benchmarks (CUDA)" "$LIMIT_CUDA" ops_cuda.json $PY -m benchmarks.ops "${OPS_ARGS[@]}" "${CEILINGS[@]}" \
    --contenders cuda --stem ops_cuda --out "$OUT"
  step "tests" "$LIMIT_TESTS" tests.xml $PY -m pytest -q -p no:cacheprovider "${TESTS[@]}" --junitxml="$OUT/tests.xml"
  if [ -n "${SANITIZE:-}" ] && command -v compute-sanitizer > /dev/null; then
    step "compute-sanitizer" 90 sanitize.log compute-sanitizer --tool memcheck --error-exitcode 1 \
      $PY -m tools.cuda_sanitize > >(tee "$OUT/sanitize.log") 2>&1
  fi
  REPORT_RESERVE_S=0
  step "report" "$LIMIT_REPORT" "" $PY -m benchmarks.report "$OUT" --into "$OUT"
  echo "== done in ${SECONDS}s"
  column -t -s $'\t' "$OUT/steps.tsv" 2> /dev/null || cat "$OUT/steps.tsv"
} 2>&1 | tee "$OUT/log"
