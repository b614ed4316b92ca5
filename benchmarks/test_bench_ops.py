"""pytest-benchmark view of the op suite: forward+backward of every op and contender.

    pytest benchmarks/ --benchmark-only          # GPU: SOLAR shapes at 16K tokens, bf16
    pytest benchmarks/ --benchmark-disable       # run each once (CPU: tiny shapes; what CI does)

Each round is synchronized with the device, so the wall clock pytest-benchmark reads is the GPU
time of the work. ``python -m benchmarks.ops`` is the fuller report (CUDA events, GB/s, ceilings).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.cases import COMPILE_TOKENS, build_cases
from benchmarks.common import sync
from benchmarks.ops import _timed_fn

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPU = DEVICE.type == "cpu"
CASES = build_cases(
    DEVICE, [torch.float32 if CPU else torch.bfloat16], cpu=CPU, sweep=False, tokens=None if CPU else [COMPILE_TOKENS]
)
PARAMS = [
    pytest.param(case, contender, id=f"{case.op}-{case.label}-{contender}")
    for case in CASES
    for contender in case.contenders
]


@pytest.mark.parametrize("case, contender", PARAMS)
def test_forward_backward(benchmark, case, contender):
    step = _timed_fn(case, contender, "fwd+bwd", [case.make_inputs()])

    def synchronized():
        result = step()
        sync(DEVICE)
        return result

    benchmark.extra_info.update(op=case.op, shape=case.label, contender=contender, dtype=str(case.dtype))
    benchmark.pedantic(synchronized, rounds=3 if CPU else 20, warmup_rounds=1)
