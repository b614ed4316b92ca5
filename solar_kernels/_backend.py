"""Which implementation runs an op: ``"torch"``, ``"triton"``, ``"cuda"``, or ``"auto"``.

Every public op takes ``backend=None|"torch"|"triton"|"cuda"|"auto"``. ``None`` is resolved once per
call:

1. the environment variable ``SOLAR_KERNELS_BACKEND``, when set, names the backend (any of the four);
2. otherwise ``"auto"``.

``"auto"`` runs the fastest implementation that runs here: on a CUDA device with the CUDA C++
extension built, Triton or CUDA per kernel and shape class, as measured once on this kind of GPU
(``solar_kernels._autotune`` says how); on a CUDA device without the extension, Triton; on the CPU,
Triton only when Triton's interpreter is on (``TRITON_INTERPRET=1``), else the PyTorch reference.

A backend that cannot run here raises ``RuntimeError`` with the reason (the extension not built, a
CPU tensor for ``"cuda"``, a GPU the build has no code for); an unknown name raises ``ValueError``.
``TRITON_INTERPRET`` is read when ``solar_kernels`` is imported, because ``triton.jit`` decides
between compiled and interpreted kernels when the kernels are defined.
"""

from __future__ import annotations

import os

import torch

from . import _cuda

BACKENDS = ("torch", "triton", "cuda")  # the implementations
CHOICES = (*BACKENDS, "auto")  # what backend= and SOLAR_KERNELS_BACKEND accept
BACKEND_ENV_VAR = "SOLAR_KERNELS_BACKEND"

# Read once at import: triton.jit picks interpreted kernels from this variable when they are defined.
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Triton is required: solar_kernels.ops (and so the model, upscale and convert) imports it; only
# merge and the checkpoint reader run without it.


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why implementation ``backend`` cannot run on ``device``, or ``None`` when it can."""
    if backend == "torch":
        return None
    if backend == "cuda":
        error = _cuda.load_error()
        if error is not None:
            return error
        if device.type != "cuda":
            return f"the CUDA C++ kernels of solar_kernels._C run on CUDA devices only, got a {device.type} tensor"
        return _cuda.device_error(device)
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


def _resolve_auto(device: torch.device, implemented: tuple[str, ...] = BACKENDS) -> str:
    """ "auto" where both fast backends run (the launchers then pick per kernel), else the one that does
    (among the ``implemented`` ones)."""
    triton_runs = "triton" in implemented and unavailable_reason("triton", device) is None
    # Only a CUDA device ever loads the extension for this decision.
    cuda_runs = "cuda" in implemented and device.type == "cuda" and unavailable_reason("cuda", device) is None
    if triton_runs and cuda_runs:
        return "auto"
    if triton_runs:
        return "triton"
    if cuda_runs:
        return "cuda"
    return "torch"


def resolve_backend(
    op: str, backend: str | None, device: torch.device, *, implemented: tuple[str, ...] = BACKENDS, option: str = ""
) -> str:
    """Turn the ``backend`` argument of ``op`` into ``"torch"``, ``"triton"``, ``"cuda"`` or ``"auto"``
    (the last only where both Triton and CUDA run on ``device``).

    ``implemented``: the backends that implement this call (a call using ``option``, e.g.
    ``"casting_mode='gemma'"``, that some backend lacks): ``"auto"`` picks among them, and naming
    another one raises ``ValueError`` naming the option and the backends that have it."""
    source = "backend"
    if backend is None:
        backend = os.environ.get(BACKEND_ENV_VAR) or None
        source = BACKEND_ENV_VAR
    if backend is None:
        backend = "auto"
    if backend not in CHOICES:
        raise ValueError(f"{op}: {source} must be one of None, 'torch', 'triton', 'cuda', 'auto'; got {backend!r}")
    if backend == "auto":
        return _resolve_auto(device, implemented)
    if backend not in implemented:
        names = ", ".join(repr(name) for name in implemented)
        raise ValueError(
            f"{op}: {option} is implemented by the {names} backends only (or 'auto'), got {source}={backend!r}"
        )
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {backend!r} is not available on {device}: {reason}")
    return backend
