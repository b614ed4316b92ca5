"""Task-vector merges relative to a base model: task arithmetic, TIES, DARE, breadcrumbs, DELLA.

For one tensor, theta_b the base model's and theta_i model i's (all in the compute dtype):
1. task vectors tau_i = theta_i - theta_b;
2. sparsify each tau_i to its ``density`` (not for task_arithmetic):
   - magnitude (ties): keep the k = max(1, floor(density * numel)) entries largest in magnitude, in the
     order of ``torch.argsort(|tau|, descending=True)`` (so ties at the cut-off fall as mergekit's);
   - random (dare_*): keep each entry with probability density (a Bernoulli mask drawn from the
     merge's seeded generator); with ``rescale`` (their default) the kept entries are scaled so
     the L1 norm is unchanged;
   - magnitude_outliers (breadcrumbs*): drop the ``gamma`` fraction of largest magnitudes, then the
     smallest, to keep floor(density * numel);
   - della_magprune (della*): keep each entry with probability from density - epsilon (smallest
     magnitude in its row) to density + epsilon (largest), then rescale;
3. with sign consensus (ties, dare_ties, breadcrumbs_ties, della): elect s = sign(sum_i w_i tau_i)
   (+ where the sum is 0) and keep only the w_i tau_i of that sign;
4. merged = sum_i w_i tau_i [kept], divided (``normalize``) by sum_i w_i [kept] (by sum_i w_i
   without consensus; a divisor of 0 counts as 1);
5. result = theta_b + lambda * merged.

The operations are mergekit's, in the same order and dtype, so with the same compute dtype the
results are mergekit's bit for bit. The random masks too: they are drawn as mergekit draws them with
``--random-seed S`` on the CPU, from one generator seeded with S, tensor by tensor in sorted name
order, model by model (see ``core.merge``), so ``seed=S`` here gives ``mergekit-yaml --random-seed S``.
"""

from __future__ import annotations

import torch

from .linear import _check_same_shapes
from .registry import MergeMethod, Parameter, fraction, register


def rescaled(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    """``tensor * mask``; with ``rescale``, scaled back to ``tensor``'s L1 norm (unless either is ~0)."""
    masked = tensor * mask
    if not rescale:
        return masked
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """1 for the max(1, floor(density * numel)) largest-magnitude entries of ``delta`` (argsort
    order), else 0."""
    keep = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    magnitude = delta.abs().reshape(-1)
    if magnitude.device.type == "cpu":
        magnitude = magnitude.float()  # CPU sorts fp32 the way mergekit does
    mask[torch.argsort(magnitude, descending=True)[:keep]] = 1
    return mask.reshape_as(delta)


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """1 for the entries left when the gamma fraction largest and the smallest are dropped."""
    numel = delta.numel()
    keep, top = int(density * numel), int(gamma * numel)
    bottom = max(0, numel - keep - top)  # fewer outliers dropped when density needs them
    magnitude = delta.abs().reshape(-1)
    if magnitude.device.type == "cpu":
        magnitude = magnitude.float()
    order = torch.sort(magnitude, descending=False).indices
    mask = torch.zeros(numel, dtype=delta.dtype, device=delta.device)
    mask[order[bottom : bottom + keep]] = 1
    return mask.reshape_as(delta)


def _work_dtype(delta: torch.Tensor) -> torch.dtype:
    return delta.dtype if delta.device.type != "cpu" or delta.dtype == torch.bfloat16 else torch.float32


def bernoulli_sparsify(delta: torch.Tensor, density: float, rescale: bool, generator) -> torch.Tensor:
    work = _work_dtype(delta)
    mask = torch.bernoulli(torch.full_like(delta, density, dtype=work), generator=generator)
    return rescaled(delta.to(work), mask, rescale).to(delta.dtype)


def della_sparsify(delta: torch.Tensor, density: float, epsilon: float, rescale: bool, generator) -> torch.Tensor:
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(
            f"della: epsilon must keep density +/- epsilon inside (0, 1), got density {density!r} "
            f"and epsilon {epsilon!r}"
        )
    work = _work_dtype(delta)
    shape = delta.shape
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta  # ranks are taken along each row
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    probability = (density - epsilon) + ((ranks - low) / (high - low)).clamp(0, 1) * 2 * epsilon
    mask = torch.bernoulli(probability, generator=generator).to(work)
    return rescaled(rows.to(work), mask, rescale).to(delta.dtype).reshape(shape)


def task_vector_merge(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    *,
    sparsify=None,
    consensus: bool,
    normalize: bool,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """Steps 1 to 5 of the module docstring; ``sparsify(i, delta)`` returns model i's sparsified
    task vector (None: no sparsification)."""
    _check_same_shapes("task_vector_merge", [base, *tensors])
    deltas = []
    for i, tensor in enumerate(tensors):
        delta = tensor.to(base.dtype) - base
        deltas.append(delta if sparsify is None else sparsify(i, delta))
    stacked = torch.stack(deltas, dim=0)  # [models, *shape]
    weight = torch.tensor([float(w) for w in weights], dtype=stacked.dtype, device=stacked.device)
    weight = weight.view(-1, *([1] * (stacked.dim() - 1)))  # [models, 1, ...]
    weighted = stacked * weight
    if consensus:
        elected = (weighted.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
        agree = weighted.sign().to(base.dtype) == elected
        mixed = (weighted * agree).sum(dim=0)
        divisor = (weight * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = weight.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return (base + mixed).to(base.dtype)


def ties_merge(base, tensors, weights, density, normalize: bool = True, lambda_: float = 1.0) -> torch.Tensor:
    """TIES-merging of ``tensors`` relative to ``base`` (magnitude trim to ``density``, one value or
    one per tensor; sign election; disjoint mean), in base's dtype."""
    densities = [density] * len(tensors) if isinstance(density, (int, float)) else list(density)
    if not tensors or len(weights) != len(tensors) or len(densities) != len(tensors):
        raise ValueError(
            f"ties_merge: expected one weight and one density per tensor, got {len(tensors)} tensors, "
            f"{len(weights)} weights, {len(densities)} densities"
        )
    for d in densities:
        if not 0.0 < d <= 1.0:
            raise ValueError(f"ties_merge: density must be in (0, 1], got {d!r}")

    def trim(i, delta):
        return delta if densities[i] >= 1 else rescaled(delta, magnitude_mask(delta, densities[i]), False)

    return task_vector_merge(
        base, list(tensors), list(weights), sparsify=trim, consensus=True, normalize=normalize, lambda_=lambda_
    )


# ----------------------------------------------------------------------------------------------
# The registered methods
# ----------------------------------------------------------------------------------------------

_WEIGHT = Parameter("weight", 1.0)
_DENSITY = Parameter("density", 1.0, allowed=fraction(), expected="in (0, 1] (the fraction of each task vector kept)")


def _family(
    name: str, summary: str, sparsification: str | None, consensus: bool, normalize: bool, rescale: bool, reference: str
) -> MergeMethod:
    tensor_parameters = [_WEIGHT] + ([_DENSITY] if sparsification else [])
    if sparsification == "magnitude_outliers":
        tensor_parameters.append(Parameter("gamma", 0.01, allowed=fraction(low_open=False), expected="in [0, 1]"))
    if sparsification == "della_magprune":
        tensor_parameters.append(Parameter("epsilon", 0.15, allowed=lambda v: 0 <= v < 1, expected="in [0, 1)"))
    parameters = [
        Parameter("normalize", normalize, kind="bool"),
        Parameter("lambda", 1.0),
        Parameter("int8_mask", False, kind="bool"),
    ]  # int8_mask: mergekit's mask storage, same result
    if sparsification:
        parameters.append(Parameter("rescale", rescale, kind="bool"))

    def combine(base, tensors, params, model_params, generator):
        def sparsify(i, delta):
            p = model_params[i]
            density = p["density"]
            if density >= 1:
                return delta
            if sparsification == "magnitude":
                return rescaled(delta, magnitude_mask(delta, density), params["rescale"])
            if sparsification == "magnitude_outliers":
                return rescaled(delta, outlier_mask(delta, density, p["gamma"]), params["rescale"])
            if sparsification == "random":
                return bernoulli_sparsify(delta, density, params["rescale"], generator)
            return della_sparsify(delta, density, p["epsilon"], params["rescale"], generator)

        return task_vector_merge(
            base,
            tensors,
            [p["weight"] for p in model_params],
            sparsify=sparsify if sparsification else None,
            consensus=consensus,
            normalize=params["normalize"],
            lambda_=params["lambda"],
        )

    return register(
        MergeMethod(
            name=name,
            summary=summary,
            combine=combine,
            parameters=tuple(parameters),
            tensor_parameters=tuple(tensor_parameters),
            base_model="required",
            min_models=1,
            random=sparsification in ("random", "della_magprune"),
            reference=reference,
        )
    )


TASK_ARITHMETIC = _family(
    "task_arithmetic",
    "base + weighted sum of task vectors",
    None,
    False,
    False,
    False,
    "https://arxiv.org/abs/2212.04089",
)
TIES = _family(
    "ties",
    "trimmed task vectors, sign election, disjoint mean",
    "magnitude",
    True,
    True,
    False,
    "https://arxiv.org/abs/2306.01708",
)
DARE_TIES = _family(
    "dare_ties",
    "random drop and rescale, sign election",
    "random",
    True,
    False,
    True,
    "https://arxiv.org/abs/2311.03099",
)
DARE_LINEAR = _family(
    "dare_linear",
    "random drop and rescale, weighted sum",
    "random",
    False,
    False,
    True,
    "https://arxiv.org/abs/2311.03099",
)
BREADCRUMBS = _family(
    "breadcrumbs",
    "drop outliers and small entries, weighted sum",
    "magnitude_outliers",
    False,
    False,
    False,
    "https://arxiv.org/abs/2312.06795",
)
BREADCRUMBS_TIES = _family(
    "breadcrumbs_ties",
    "breadcrumbs with sign election",
    "magnitude_outliers",
    True,
    False,
    False,
    "https://arxiv.org/abs/2312.06795",
)
DELLA = _family(
    "della",
    "magnitude-ranked random drop and rescale, sign election",
    "della_magprune",
    True,
    True,
    True,
    "https://arxiv.org/abs/2406.11617",
)
DELLA_LINEAR = _family(
    "della_linear",
    "della without sign election",
    "della_magprune",
    False,
    False,
    True,
    "https://arxiv.org/abs/2406.11617",
)
