"""pytest-benchmark set-up: on a CPU-only machine the Triton kernels run through the interpreter
(tiny shapes: the run checks the benchmarks work; its timings mean nothing)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
