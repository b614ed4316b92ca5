"""solar_kernels: fused kernels, a lean Llama/Mistral model and the SOLAR depth up-scaling recipe.

The ops are drop-in functions for any PyTorch model::

    import solar_kernels as sk
    y = sk.rms_norm(x, weight, eps=1e-6)
    q2, k2 = sk.apply_rotary(q, k, cos, sin)
    loss = sk.linear_cross_entropy(hidden, lm_head.weight, labels)

Each takes ``backend=None|"torch"|"triton"|"cuda"|"auto"`` (see ``solar_kernels._backend``; ``None``
means ``"auto"``, which on a GPU with the CUDA extension picks Triton or CUDA per kernel and shape
class as measured on that GPU, see ``solar_kernels._autotune``).

The public names are imported on first use (``sk.rms_norm``, ``from solar_kernels import *``), so
that ``import solar_kernels`` alone, and the ``solar`` command's ``--help`` and ``--version``, do
not import torch or Triton. ``TRITON_INTERPRET`` is read at that first use. A submodule
(``from solar_kernels import merge``, ``sk.checkpoint``) is imported as itself, without the ops, so
the parts that need only torch work where Triton is not installed.
"""

from __future__ import annotations

import importlib
import importlib.util

__version__ = "0.1.0"
_importing = False


def _import_public_names() -> None:
    """Imports the kernels, backends and HF patching into this module (once) and sets __all__."""
    global _importing
    _importing = True  # `from . import x` inside the submodules asks __getattr__ for x: not us then
    try:
        _import_submodules()
    finally:
        _importing = False


def _import_submodules() -> None:
    from . import ops
    from ._backend import BACKEND_ENV_VAR, BACKENDS, resolve_backend
    from .patch import patch_hf_model, unpatch_hf_model

    public = {
        "BACKENDS": BACKENDS,
        "BACKEND_ENV_VAR": BACKEND_ENV_VAR,
        "patch_hf_model": patch_hf_model,
        "resolve_backend": resolve_backend,
        "unpatch_hf_model": unpatch_hf_model,
    }
    public.update({name: getattr(ops, name) for name in ops.__all__})
    globals().update(public, __all__=[*public, "__version__"])


def __getattr__(name: str):
    # A private name (`from . import _cuda` inside a submodule) is the import system's business.
    public = name == "__all__" or not name.startswith("_")
    # `from solar_kernels import merge` asks this module for `merge` before importing the submodule:
    # answer with the submodule, not by importing the ops first (which need Triton).
    if public and name != "__all__" and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    if public and "__all__" not in globals() and not _importing:
        _import_public_names()
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    if "__all__" not in globals() and not _importing:
        _import_public_names()
    return sorted(globals())
