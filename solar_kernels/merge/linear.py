"""Linear merge (model soup, Wortsman et al. 2022; SOLAR-10.7B-Instruct is Average(0.5, 0.5)).

    merged = sum_i w_i theta_i / sum_i w_i      (normalize: true, the default)
    merged = sum_i w_i theta_i                   (normalize: false)

Computed as mergekit 0.1.5 does: the sources are read in the compute dtype (so ``dtype: bfloat16``
rounds fp32 sources first), accumulated in fp32 with ``addcmul_`` in the models' order, divided by
the fp32 sum of the weights and returned in the compute dtype; the result is mergekit's bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .registry import Parameter, merge_method


def _check_same_shapes(op: str, tensors: Sequence[torch.Tensor]) -> None:
    for i, tensor in enumerate(tensors[1:], start=1):
        if tensor.shape != tensors[0].shape:
            raise ValueError(
                f"{op}: tensor {i} has shape {list(tensor.shape)}, expected {list(tensors[0].shape)} (tensor 0)"
            )


def linear_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """sum_i w_i * tensors[i] (divided by sum_i w_i when ``normalize``), accumulated in fp32 (fp64
    for fp64 tensors) in the models' order, returned in the first tensor's dtype."""
    if len(tensors) == 0 or len(tensors) != len(weights):
        raise ValueError(
            f"linear_merge: expected one weight per tensor, got {len(weights)} weights for {len(tensors)} tensors"
        )
    _check_same_shapes("linear_merge", tensors)
    first = tensors[0]
    accumulate = torch.float64 if first.dtype == torch.float64 else torch.float32
    weight = torch.tensor([float(w) for w in weights], dtype=torch.float64).to(accumulate)
    if normalize and weight.sum() == 0:
        raise ValueError(f"linear_merge: weights must not sum to 0 with normalize=True, got {list(weights)}")
    broadcast = [1] * first.dim()
    merged = torch.zeros_like(first, dtype=accumulate)
    for tensor, coefficient in zip(tensors, weight.unbind(0)):
        merged.addcmul_(tensor, coefficient.reshape(broadcast))
    if normalize:
        merged.div_(weight.sum().reshape(broadcast))
    return merged.to(first.dtype)


@merge_method(
    name="linear",
    summary="weighted average of the models",
    parameters=(Parameter("normalize", True, kind="bool"),),
    tensor_parameters=(Parameter("weight", 1.0),),
    reference="https://arxiv.org/abs/2203.05482",
)
def _combine(base, tensors, params, model_params, generator):
    return linear_merge(tensors, [p["weight"] for p in model_params], params["normalize"])
