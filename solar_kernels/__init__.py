"""solar_kernels: fused kernels, a lean Llama/Mistral model and the SOLAR depth up-scaling recipe.

The ops are drop-in functions for any PyTorch model::

    import solar_kernels as sk
    y = sk.rms_norm(x, weight, eps=1e-6)
    q2, k2 = sk.apply_rotary(q, k, cos, sin)
    loss = sk.linear_cross_entropy(hidden, lm_head.weight, labels)

Each takes ``backend=None|"torch"|"triton"|"cuda"|"auto"`` (see ``solar_kernels._backend``; ``None``
means ``"auto"``, which on a GPU with the CUDA extension picks Triton or CUDA per kernel and shape
class as measured on that GPU, see ``solar_kernels._autotune``).
"""

from ._backend import BACKEND_ENV_VAR, BACKENDS, resolve_backend
from .ops import *  # noqa: F401,F403
from .ops import __all__ as _ops_all
from .patch import patch_hf_model, unpatch_hf_model

__version__ = "0.1.0"
__all__ = ["BACKENDS", "BACKEND_ENV_VAR", "patch_hf_model", "resolve_backend", "unpatch_hf_model",
           "__version__", *_ops_all]
