"""NuSLERP: spherical interpolation of two models (or of their task vectors, with a base model),
factor t = w_2 / (w_1 + w_2) from the two models' weights (0.5 when they sum to ~0).

``nuslerp_flatten`` (default true) treats each tensor as one vector; else each row
(``nuslerp_row_wise``: each column) is interpolated on its own. For unit vectors u, v with
cos = <u, v>: merged = (sin((1 - t) theta) a + sin(t theta) b) / sin(theta), linear where
1 - cos^2 <= 1e-16. With a base model the result is base + nuslerp of the task vectors. The
operations are mergekit's, in the compute dtype, so the results are its results bit for bit.
"""

from __future__ import annotations

import torch

from .registry import Parameter, merge_method


def _unit(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)


def nuslerp(
    t: float, a: torch.Tensor, b: torch.Tensor, *, row_wise: bool = False, flatten: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    shape = a.shape
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif row_wise:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    cosine = torch.sum(_unit(a) * _unit(b), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cosine.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cosine))
    merged = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    merged = torch.where(colinear, (1 - t) * a + t * b, merged)
    if row_wise and not flatten:
        merged = merged.transpose(0, -1)
    return merged.reshape(shape)


@merge_method(
    name="nuslerp",
    summary="spherical interpolation by weights, of the models or of their task vectors",
    parameters=(Parameter("nuslerp_row_wise", False, kind="bool"), Parameter("nuslerp_flatten", True, kind="bool")),
    tensor_parameters=(Parameter("weight", 1.0),),
    base_model="optional",
    min_models=2,
    max_models=2,
)
def _combine(base, tensors, params, model_params, generator):
    weights = [p["weight"] for p in model_params]
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    options = dict(row_wise=params["nuslerp_row_wise"], flatten=params["nuslerp_flatten"])
    if base is None:
        return nuslerp(t, tensors[0], tensors[1], **options)
    return base + nuslerp(t, tensors[0] - base, tensors[1] - base, **options)
