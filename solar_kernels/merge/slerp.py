"""SLERP: spherical interpolation between two models, factor t (t = 0 gives the base model).

Each tensor is one flat vector. The angle comes from the normalized vectors,
    cos(omega) = <a / |a|, b / |b|>,
and the raw vectors are interpolated:
    merged = sin((1 - t) omega) / sin(omega) * a + sin(t omega) / sin(omega) * b.
When |cos(omega)| > SLERP_DOT_THRESHOLD (0.9995) the vectors are nearly (anti)parallel,
sin(omega) is too small to divide by, and the result is (1 - t) a + t b; a vector with norm <= eps
is not normalized (so its dot product is tiny and the formula above is used).

As mergekit 0.1.5: the math runs in fp32 (chunks of 2^20 elements for the norms and the dot
product) on the tensors in the compute dtype, and the result returns to the base tensor's dtype,
so results match mergekit's bit for bit.
"""

from __future__ import annotations

import torch

from .linear import _check_same_shapes
from .registry import Parameter, fraction, merge_method

# Above this |cos(angle)| slerp falls back to linear interpolation: mergekit's DOT_THRESHOLD.
SLERP_DOT_THRESHOLD = 0.9995


# Elements per chunk of fp32 scratch (mergekit's value: its chunked sums are reproduced exactly).
_CHUNK_ELEMENTS = 1024 * 1024


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t=0) to ``b`` (t=1); linear when nearly parallel (see
    the module docstring). fp32 inside (fp64 for fp64 inputs), returned in a's dtype."""
    _check_same_shapes("slerp", [a, b])
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"slerp: t must be in [0, 1], got {t!r}")
    work = torch.float64 if a.dtype == torch.float64 else torch.float32
    flat_a, flat_b = a.reshape(1, -1), b.reshape(1, -1)  # [1, numel]: one vector per tensor
    factor = torch.tensor([float(t)], dtype=torch.float64).reshape(-1, 1).to(work)
    if not flat_a.shape[1]:
        return ((1 - factor) * flat_a + factor * flat_b).reshape(a.shape).to(a.dtype)
    chunks = range(0, flat_a.shape[1], _CHUNK_ELEMENTS)

    def chunk(x: torch.Tensor, start: int) -> torch.Tensor:
        return x[:, start : start + _CHUNK_ELEMENTS].to(work)

    # |a| as the norm of the chunks' norms, then the dot product of the normalized vectors.
    norm_a = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(chunk(flat_a, s), dim=1, keepdim=True) for s in chunks]), dim=0
    )
    norm_b = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(chunk(flat_b, s), dim=1, keepdim=True) for s in chunks]), dim=0
    )
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = (
        torch.stack(
            [(chunk(flat_a, s) / norm_a * (chunk(flat_b, s) / norm_b)).sum(dim=1, keepdim=True) for s in chunks]
        )
        .sum(dim=0)
        .clamp(-1, 1)
    )
    parallel = dot.abs() > SLERP_DOT_THRESHOLD
    omega = torch.acos(torch.where(parallel, 0, dot))
    sin_omega = torch.sin(omega)
    coefficient_a = torch.where(parallel, 1 - factor, torch.sin((1 - factor) * omega) / sin_omega)
    coefficient_b = torch.where(parallel, factor, torch.sin(factor * omega) / sin_omega)
    merged = torch.empty_like(flat_a)
    for s in chunks:
        merged[:, s : s + _CHUNK_ELEMENTS] = coefficient_a * chunk(flat_a, s) + coefficient_b * chunk(flat_b, s)
    return merged.reshape(a.shape)


@merge_method(
    name="slerp",
    summary="spherical interpolation between two models",
    parameters=(Parameter("t", allowed=fraction(low_open=False), expected="in [0, 1] (0 gives the base model)"),),
    base_model="first",
    min_models=1,
    max_models=1,
    reference="https://en.wikipedia.org/wiki/Slerp",
)
def _combine(base, tensors, params, model_params, generator):
    return slerp(base, tensors[0], params["t"])
