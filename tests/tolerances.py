"""The one tolerance table, and the error measure every kernel test uses.

A kernel is judged against an exact float64 computation, relative to PyTorch's own error in the
same dtype on the same input: ``err(ours) <= 2 * err(eager torch) + FLOOR[dtype]``, with
``err(a) = ||a - exact|| / ||exact||``. The floor covers outputs where eager happens to be exact.
"""

from __future__ import annotations

import torch

from solar_kernels import selfcheck
from solar_kernels.checkpoint import SHORT_DTYPE_NAMES

FLOOR = {
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}
DTYPES = list(FLOOR)
DTYPE_IDS = [SHORT_DTYPE_NAMES[dtype] for dtype in DTYPES]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``selfcheck.rel_err`` (||actual - expected|| / ||expected|| in float64, the absolute error when
    expected is all zero), on the CPU, after checking that the shapes match and actual is finite."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), "non-finite values in the result"
    return selfcheck.rel_err(actual, expected)


def assert_close(name: str, ours: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype):
    """ours within 2x eager's error of the float64 result (plus the dtype's floor), and near eager."""
    err_ours = rel_err(ours, exact)
    err_eager = rel_err(eager, exact)
    bound = 2 * err_eager + FLOOR[dtype]
    assert err_ours <= bound, (
        f"{name}: error vs float64 {err_ours:.3e} exceeds {bound:.3e} (eager torch {err_eager:.3e}, {dtype})"
    )
    err_vs_eager = rel_err(ours, eager)
    assert err_vs_eager <= 3 * err_eager + FLOOR[dtype], (
        f"{name}: differs from the eager reference by {err_vs_eager:.3e} (eager's own error {err_eager:.3e}, {dtype})"
    )
