"""Direct Preference Optimization losses (the loss types of TRL's ``DPOTrainer``).

With policy log-probs pi_c, pi_r and reference log-probs ref_c, ref_r of the chosen and rejected
completions (``sequence_logprobs``), h = (pi_c - ref_c) - (pi_r - ref_r), beta > 0 and label
smoothing eps:

    sigmoid  -log sigmoid(beta h) (1 - eps) - log sigmoid(-beta h) eps        (eps in [0, 0.5))
    ipo      (h - 1 / (2 beta))^2        pass per-token averaged log-probs (``average=True``)
    hinge    relu(1 - beta h)
    robust   (-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)

Returns the mean over pairs and the detached rewards beta (pi_c - ref_c), beta (pi_r - ref_r).
Inputs: four tensors of one shape ([B]), one float dtype (float64 too), one device; the result is in their dtype.
The work is a handful of elementwise ops on B numbers, so every backend runs the same PyTorch
code; ``backend`` is still validated so the op behaves like the others. It is no custom op, so under
``torch.autocast`` autocast's own rules apply to that code (its inputs, fp32 sequence log-probs,
stay fp32).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._backend import resolve_backend
from .._checks import FLOAT_DTYPES, check_float_tensor, check_same_device_dtype, check_shape

OP = "dpo_loss"
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss_ref(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chosen_logratio = policy_chosen - reference_chosen
    rejected_logratio = policy_rejected - reference_rejected
    h = chosen_logratio - rejected_logratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - eps) - F.logsigmoid(-beta * h) * eps
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # robust
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return losses.mean(), (beta * chosen_logratio).detach(), (beta * rejected_logratio).detach()


def _check_args(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, loss_type, label_smoothing):
    named = {
        "policy_chosen": policy_chosen,
        "policy_rejected": policy_rejected,
        "reference_chosen": reference_chosen,
        "reference_rejected": reference_rejected,
    }
    for name, tensor in named.items():
        check_float_tensor(OP, name, tensor, dtypes=(*FLOAT_DTYPES, torch.float64))
    others = dict(list(named.items())[1:])
    check_same_device_dtype(OP, "policy_chosen", policy_chosen, **others)
    for name, tensor in others.items():
        check_shape(OP, name, tensor, tuple(policy_chosen.shape), "policy_chosen.shape")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"{OP}: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
        raise ValueError(f"{OP}: beta must be a positive float, got {beta!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or not 0 <= label_smoothing < 0.5:
        raise ValueError(f"{OP}: label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing and loss_type in ("ipo", "hinge"):
        raise ValueError(
            f"{OP}: label_smoothing is used by the sigmoid and robust losses only, "
            f"got label_smoothing={label_smoothing!r} with loss_type={loss_type!r}"
        )


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    *,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen_rewards, rejected_rewards): the mean DPO loss over pairs and detached rewards."""
    _check_args(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, loss_type, label_smoothing)
    resolve_backend(OP, backend, policy_chosen.device)
    return dpo_loss_ref(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, loss_type, label_smoothing
    )
