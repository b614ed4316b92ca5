"""Model Stock (Jang et al. 2024): interpolate between the base and the models' average by how
aligned their task vectors are.

For one tensor (``filter_wise``: for each row of it), w_0 the base's and w_1..w_N the models'
(N >= 2), offsets d_i = w_i - w_0 and cos = the mean over pairs i < j of
<d_i, d_j> / max(|d_i| |d_j|, 1e-6) (clamped to [-1, 1]):
    t = N cos / (1 + (N - 1) cos)          (t = 0 where the denominator is below 1e-6)
    merged = t * mean_i(w_i) + (1 - t) * w_0
The operations are mergekit's, in the compute dtype, so the results are its results bit for bit.
"""

from __future__ import annotations

import torch

from .registry import Parameter, merge_method


def model_stock(base: torch.Tensor, tensors: list[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    shape = base.shape
    if filter_wise:
        rows = [base.unsqueeze(0) if base.dim() == 1 else base]
        rows += [t.unsqueeze(0) if t.dim() == 1 else t for t in tensors]
    else:
        rows = [base.reshape(-1)] + [t.reshape(-1) for t in tensors]  # one vector per tensor
    base_rows, model_rows = rows[0], rows[1:]
    offsets = [w - base_rows for w in model_rows]
    cosines = []
    for i, left in enumerate(offsets):
        for right in offsets[i + 1 :]:
            norms = torch.norm(left, dim=-1) * torch.norm(right, dim=-1)
            cosines.append(((left * right).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cosine = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(model_rows)
    denominator = 1 + (count - 1) * cosine
    singular = denominator.abs() < 1e-6  # no finite estimate: keep the base
    t = torch.where(
        singular,
        torch.zeros_like(cosine),
        (count * cosine) / torch.where(singular, torch.ones_like(denominator), denominator),
    )
    average = sum(model_rows) / count
    return (t * average + (1 - t) * base_rows).reshape(shape)


@merge_method(
    name="model_stock",
    summary="interpolate base and average by the task vectors' agreement",
    parameters=(Parameter("filter_wise", False, kind="bool"),),
    base_model="required",
    min_models=2,
    reference="https://arxiv.org/abs/2403.19522",
)
def _combine(base, tensors, params, model_params, generator):
    return model_stock(base, tensors, params["filter_wise"])
