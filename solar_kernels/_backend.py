"""Which implementation runs an op: ``"torch"``, ``"triton"`` or ``"cuda"``.

Every public op takes ``backend=None|"torch"|"triton"|"cuda"``. ``None`` is resolved once per call:

1. the environment variable ``SOLAR_KERNELS_BACKEND``, when set, names the backend;
2. otherwise the tensor's device decides: ``"triton"`` on a CUDA device, and on the CPU ``"triton"``
   only when Triton's interpreter is on (``TRITON_INTERPRET=1``), else ``"torch"``.

A backend that cannot run here raises ``RuntimeError`` with the reason; an unknown name raises
``ValueError``. ``TRITON_INTERPRET`` is read when ``solar_kernels`` is imported, because
``triton.jit`` decides between compiled and interpreted kernels when the kernels are defined.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

BACKENDS = ("torch", "triton", "cuda")
BACKEND_ENV_VAR = "SOLAR_KERNELS_BACKEND"

# Read once at import: triton.jit picks interpreted kernels from this variable when they are defined.
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

try:
    import triton  # noqa: F401

    _TRITON_IMPORT_ERROR: Optional[str] = None
except ImportError as error:  # pragma: no cover - triton is an install requirement on Linux
    _TRITON_IMPORT_ERROR = str(error)


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device``, or ``None`` when it can."""
    if backend == "torch":
        return None
    if backend == "cuda":
        return "the CUDA C++ extension solar_kernels._C is not part of this build yet"
    if _TRITON_IMPORT_ERROR is not None:
        return f"triton cannot be imported ({_TRITON_IMPORT_ERROR})"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if TRITON_INTERPRETED:
            return None
        return (
            "Triton kernels need a CUDA device; CPU tensors run them only through Triton's "
            "interpreter, which needs TRITON_INTERPRET=1 set before solar_kernels is imported"
        )
    return f"Triton kernels do not run on device type {device.type!r}"


def resolve_backend(op: str, backend: Optional[str], device: torch.device) -> str:
    """Turn the ``backend`` argument of ``op`` into the name of a backend that runs on ``device``."""
    source = "backend"
    if backend is None:
        backend = os.environ.get(BACKEND_ENV_VAR) or None
        source = BACKEND_ENV_VAR
    if backend is None:
        return "triton" if unavailable_reason("triton", device) is None else "torch"
    if backend not in BACKENDS:
        raise ValueError(
            f"{op}: {source} must be one of None, 'torch', 'triton', 'cuda'; got {backend!r}"
        )
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {backend!r} is not available on {device}: {reason}")
    return backend
