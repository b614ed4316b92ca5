"""The CUDA C++ extension ``solar_kernels._C``: loading it and which GPUs it has code for.

``import solar_kernels`` never imports the extension: ``load_error()`` tries once, when a backend
decision first needs it, so an install without it (pure Triton/torch, CPU builds of torch) works as
before. Its ops (``torch.ops.solar_kernels_C.*``, schemas in csrc/torch_bindings.cpp) are all
out-variants: the caller allocates the outputs by the contract of their record in
solar_kernels/ops/_registry.py and the op returns nothing, so they need no fakes (torch traces them
as writing their ``Tensor(a!)`` arguments). The C++ library still names this module as its Python
module.
"""

from __future__ import annotations

import importlib
import re
import sys

import torch

EXTENSION = "solar_kernels._C"
_NOT_TRIED = object()
_load_error: object = _NOT_TRIED  # None once loaded, else the reason it is not


# Backend resolution runs inside torch.compile'd code: Dynamo calls these two at trace time and
# keeps their result as a constant, instead of tracing an import (a graph break).
@torch.compiler.assume_constant_result
def load_error() -> str | None:
    """None when ``solar_kernels._C`` is loaded (its ops registered), else why it is not."""
    global _load_error
    if _load_error is _NOT_TRIED:
        try:
            importlib.import_module(EXTENSION)
        except ImportError as error:
            _load_error = (
                f"the CUDA C++ extension {EXTENSION} is not built in this install ({error}); setup.py "
                "builds it when torch is a CUDA build and nvcc is found"
            )
        else:
            _load_error = None
    return _load_error  # type: ignore[return-value]


def built_archs() -> tuple[str, ...]:
    """The targets the extension carries, e.g. ("sm_80", "sm_90a"); call after load_error() is None."""
    return tuple(sys.modules[EXTENSION].cuda_archs.split("+"))


def runs_on(archs, capability: tuple[int, int]) -> bool:
    """Whether a GPU of compute ``capability`` (major, minor) can run code built for ``archs``.

    ``sm_XY`` cubins run on major X with minor >= Y; ``sm_XYa`` (arch-specific, e.g. Hopper's sm_90a)
    only on X.Y exactly; ``compute_XY`` PTX is compiled by the driver for X.Y and anything newer.
    """
    major, minor = capability
    for arch in archs:
        match = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", arch)
        if match is None:
            continue
        kind, arch_major, arch_minor, suffix = match.group(1), int(match.group(2)), int(match.group(3)), match.group(4)
        if suffix == "a":
            if (major, minor) == (arch_major, arch_minor):
                return True
        elif kind == "compute":
            if (major, minor) >= (arch_major, arch_minor):
                return True
        elif major == arch_major and minor >= arch_minor:
            return True
    return False


@torch.compiler.assume_constant_result
def device_error(device: torch.device) -> str | None:
    """None when the loaded extension has code for this CUDA device, else why not."""
    capability = torch.cuda.get_device_capability(device)
    archs = built_archs()
    if runs_on(archs, capability):
        return None
    major, minor = capability
    return (
        f"{EXTENSION} was built for {', '.join(archs)}, which cannot run on this sm_{major}{minor} GPU; "
        f"rebuild with SOLAR_KERNELS_CUDA_ARCHS={major}.{minor}"
    )
