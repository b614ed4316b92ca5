"""Direct Preference Optimization losses: the loss types of TRL 1.x's ``DPOTrainer``, plus cDPO.

Inputs are summed sequence log-probs (``sequence_logprobs`` with ``average=False``) of the policy,
pi_c and pi_r, and of the reference, ref_c and ref_r, for the chosen and rejected completions. With
c = pi_c - ref_c, r = pi_r - ref_r, h = c - r, beta > 0, eps = ``label_smoothing``, s = sigmoid,
ls = log sigmoid, and n_c, n_r the completion token counts (``chosen_lengths``, ``rejected_lengths``):

    sigmoid       -ls(beta h)                                   DPO, Rafailov et al. 2023 (arXiv 2305.18290)
    cdpo          -(1 - eps) ls(beta h) - eps ls(-beta h)       conservative DPO (Mitchell 2023, "A note on DPO
                                                                with noisy preferences")
    robust        (-(1 - eps) ls(beta h) + eps ls(-beta h)) / (1 - 2 eps)
                                                                rDPO, Chowdhury et al. 2024 (arXiv 2403.00409)
    hinge         relu(1 - beta h)                              SLiC, Zhao et al. 2023 (arXiv 2305.10425)
    ipo           (c / n_c - r / n_r - 1 / (2 beta))^2          IPO, Azar et al. 2023 (arXiv 2310.12036), Eq. 17,
                                                                per-token averaged as TRL does (with the authors)
    exo_pair      q (log q - log(1 - eps)) + (1 - q) (log(1 - q) - log eps),  q = s(beta h)
                                                                EXO, Ji et al. 2024 (arXiv 2402.00856), Eq. 16:
                                                                KL from the model's pair distribution to the
                                                                smoothed label [1 - eps, eps]; needs eps > 0
    nca_pair      -ls(beta c) - ls(-beta c) / 2 - ls(-beta r) / 2   NCA, Chen et al. 2024 (arXiv 2402.05369)
    bco_pair      -ls(beta c - delta) - ls(-(beta r - delta))   BCO, Jung et al. 2024 (arXiv 2404.04656);
                                                                delta = ``bco_delta`` (see below)
    sppo_hard     (c - 1 / (2 beta))^2 + (r + 1 / (2 beta))^2   SPPO, Wu et al. 2024 (arXiv 2405.00675), Eq. 4.7
                                                                with a hard win probability of 1
    aot           cdpo's formula on sort(pi_c - pi_r) - sort(ref_c - ref_r) (sorted over the batch)
    aot_unpaired  cdpo's formula on sort(c) - sort(r)           AOT, Melnyk et al. 2024 (arXiv 2406.05882)
    apo_zero      1 - s(beta c) + s(beta r)                     APO, D'Oosterlinck et al. 2024 (arXiv 2408.06266),
    apo_down      s(beta c) + 1 - s(beta h)                     Eqs. 7 and 8
    discopop      -ls(beta h) (1 - m) + exp(-beta h) m,  m = s(beta h / tau)
                                                                DiscoPOP, Lu et al. 2024 (arXiv 2406.08414),
                                                                Eq. 5; tau = ``discopop_tau`` (TRL's default 0.05)
    sigmoid_norm  -ls(beta (c / n_c - r / n_r))                 DPO on per-token averaged log-ratios
    sft           -sum(pi_c) / sum(n_c) over the batch          NLL per chosen token; with a weight alpha next
                                                                to sigmoid this is RPO (Pang et al. 2024, arXiv
                                                                2404.19733), TRL 0.x's ``rpo_alpha``

``loss_type`` may list several types: the loss is sum_i loss_weights[i] * mean over pairs of type i
(weights default to 1 each; TRL's ``loss_type`` list + ``loss_weights``, e.g. MPO = sigmoid + bco_pair
+ sft). Every type but sft is a mean over the B pairs; sft is one batch-level token mean.

Returns (loss, chosen_rewards, rejected_rewards): rewards are beta c and beta r from the summed
log-probs for every loss type (TRL 1.x), detached.

Decisions where TRL's versions disagree (checked against TRL 1.16 on committed fixtures,
tests/fixtures/trl/):
- ``sigmoid`` is plain DPO, as in TRL >= 0.29, which ignores label_smoothing there; TRL <= 0.28 made
  it conservative DPO. That meaning has its own name here, ``cdpo``, and ``sigmoid`` with
  ``label_smoothing > 0`` is refused (one line pointing to ``cdpo``) rather than silently changed.
- ``ipo`` and ``sigmoid_norm`` take summed log-probs plus the token counts and average inside (TRL
  1.x). Earlier versions of this op took per-token averaged log-probs for ipo, so its rewards were
  per-token averages; now rewards (and a caller's ``logps/*``) mean the summed values for every type.
- TRL 0.x's ``aot_pair`` is TRL 1.x's ``aot_unpaired`` (same formula, renamed); the old name is refused
  with a pointer to the new one.
- ``bco_pair``: TRL 0.x shifted both rewards by a running mean of past batches' mean reward (state
  inside the trainer); TRL 1.x has no shift. The op stays stateless: the shift is the explicit
  ``bco_delta`` argument (default 0, TRL 1.x). A caller reproducing 0.x keeps the running mean of
  ``torch.cat([chosen_rewards, rejected_rewards]).mean()`` itself and passes it in.
- ``sft`` over a batch without chosen tokens is 0 here (TRL: NaN from an empty mean).
- Not here: TRL's f-divergence scores, ``ld_alpha`` (length desensitization, needs per-token
  log-probs) and WPO weighting (``use_weighting``, needs per-token probabilities).

Inputs: four tensors of one shape ([B]), one float dtype (float64 too), one device; lengths [B] of
any real dtype on that device; the result is in the inputs' dtype. The work is a handful of
elementwise ops on B numbers, plain PyTorch on every device, so the op takes no ``backend`` and is
its own reference (``dpo_loss_ref`` is ``dpo_loss``, argument checks included). It is no custom
op, so under ``torch.autocast`` autocast's own rules apply to that code (its inputs, fp32 sequence
log-probs, stay fp32).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import _checks

OP = "dpo_loss"
LOSS_TYPES = (
    "sigmoid",
    "cdpo",
    "robust",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "sft",
)
# Loss types that read label_smoothing; exo_pair needs it positive.
SMOOTHED_TYPES = ("cdpo", "robust", "exo_pair", "aot", "aot_unpaired")
# Loss types that need the completion token counts, and which of them.
_NEEDS_LENGTHS = {
    "ipo": ("chosen_lengths", "rejected_lengths"),
    "sigmoid_norm": ("chosen_lengths", "rejected_lengths"),
    "sft": ("chosen_lengths",),
}
_RENAMED = {"aot_pair": "aot_unpaired"}


def _smoothed_sigmoid(logits: torch.Tensor, eps: float) -> torch.Tensor:
    return -F.logsigmoid(logits) * (1 - eps) - F.logsigmoid(-logits) * eps


def _per_pair_loss(
    loss_type, pc, pr, rc, rr, c, r, beta, eps, chosen_lengths, rejected_lengths, discopop_tau, bco_delta
) -> torch.Tensor:
    """Per-pair losses [B] of one type (sft: its batch value, a 0-d tensor)."""
    h = c - r
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * h)
    if loss_type == "cdpo":
        return _smoothed_sigmoid(beta * h, eps)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    if loss_type in ("ipo", "sigmoid_norm"):
        # counts as TRL: a row without completion tokens divides by 1
        h_avg = c / chosen_lengths.to(c.dtype).clamp(min=1) - r / rejected_lengths.to(r.dtype).clamp(min=1)
        return (h_avg - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -F.logsigmoid(beta * h_avg)
    if loss_type == "exo_pair":
        logits = beta * h
        q_chosen, q_rejected = torch.sigmoid(logits), torch.sigmoid(-logits)
        return q_chosen * (F.logsigmoid(logits) - math.log1p(-eps)) + q_rejected * (
            F.logsigmoid(-logits) - math.log(eps)
        )
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * c - bco_delta) - F.logsigmoid(-(beta * r - bco_delta))
    if loss_type == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if loss_type == "aot":
        # the batch's policy and reference margins are matched by rank, not by pair
        delta = torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values
        return _smoothed_sigmoid(beta * delta, eps)
    if loss_type == "aot_unpaired":
        delta = torch.sort(c, dim=0).values - torch.sort(r, dim=0).values
        return _smoothed_sigmoid(beta * delta, eps)
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * h)
    if loss_type == "discopop":
        logits = beta * h
        mix = torch.sigmoid(logits / discopop_tau)
        return -F.logsigmoid(logits) * (1 - mix) + torch.exp(-logits) * mix
    # sft: one token mean over the whole batch's chosen completions
    return -pc.sum() / chosen_lengths.to(pc.dtype).sum().clamp(min=1)


def check_loss_options(
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    loss_weights: Sequence[float] | None = None,
    discopop_tau: float = 0.05,
) -> list[str]:
    """The loss types as a list, after checking the non-tensor options of ``dpo_loss`` (a config can
    call this before any model is built); raises ValueError in one line otherwise."""
    if isinstance(loss_type, str):
        loss_types = [loss_type]
    elif isinstance(loss_type, Sequence) and loss_type and all(isinstance(t, str) for t in loss_type):
        loss_types = list(loss_type)
    else:
        raise ValueError(f"{OP}: loss_type must be a loss type name or a non-empty list of them, got {loss_type!r}")
    for one_type in loss_types:
        if one_type in _RENAMED:
            raise ValueError(
                f"{OP}: loss_type {one_type!r} is TRL 0.x's name; TRL 1.x and this op call the same "
                f"loss {_RENAMED[one_type]!r}"
            )
        if one_type not in LOSS_TYPES:
            raise ValueError(f"{OP}: loss_type must be one of {LOSS_TYPES}, got {one_type!r}")
    if loss_weights is not None:
        if isinstance(loss_weights, (str, bytes)) or not isinstance(loss_weights, Sequence):
            raise ValueError(f"{OP}: loss_weights must be a list of floats, got {loss_weights!r}")
        if len(loss_weights) != len(loss_types):
            raise ValueError(
                f"{OP}: loss_weights has {len(loss_weights)} entries, expected {len(loss_types)} "
                f"(one per loss_type {loss_types})"
            )
        if not all(_checks.is_finite_number(w) for w in loss_weights):
            raise ValueError(f"{OP}: loss_weights must be finite floats, got {list(loss_weights)!r}")

    if not _checks.is_finite_number(beta) or not beta > 0:
        raise ValueError(f"{OP}: beta must be a positive float, got {beta!r}")
    if not _checks.is_finite_number(label_smoothing) or not 0 <= label_smoothing < 0.5:
        raise ValueError(f"{OP}: label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing and "sigmoid" in loss_types:
        raise ValueError(
            f"{OP}: loss_type 'sigmoid' ignores label_smoothing (TRL >= 0.29); for conservative DPO "
            f"use loss_type='cdpo', got label_smoothing={label_smoothing!r}"
        )
    if label_smoothing and not set(loss_types) & set(SMOOTHED_TYPES):
        raise ValueError(
            f"{OP}: label_smoothing is used by the {', '.join(SMOOTHED_TYPES)} losses only, "
            f"got label_smoothing={label_smoothing!r} with loss_type={loss_type!r}"
        )
    if "exo_pair" in loss_types and not label_smoothing > 0:
        raise ValueError(
            f"{OP}: loss_type 'exo_pair' needs label_smoothing in (0, 0.5) (the EXO paper uses 1e-3), "
            f"got {label_smoothing!r}"
        )
    if not _checks.is_finite_number(discopop_tau) or not discopop_tau > 0:
        raise ValueError(f"{OP}: discopop_tau must be a positive float, got {discopop_tau!r}")
    return loss_types


def _check_log_probs(policy_chosen, policy_rejected, reference_chosen, reference_rejected):
    """The four log-prob tensors: float, one shape, dtype and device."""
    named = {
        "policy_chosen": policy_chosen,
        "policy_rejected": policy_rejected,
        "reference_chosen": reference_chosen,
        "reference_rejected": reference_rejected,
    }
    for name, tensor in named.items():
        _checks.check_float_tensor(OP, name, tensor, dtypes=(*_checks.FLOAT_DTYPES, torch.float64))
    others = dict(list(named.items())[1:])
    _checks.check_same_device_dtype(OP, "policy_chosen", policy_chosen, **others)
    for name, tensor in others.items():
        _checks.check_shape(OP, name, tensor, tuple(policy_chosen.shape), "policy_chosen.shape")


def _check_bco_delta(policy_chosen, bco_delta):
    """bco_delta: a finite float or a 0-d float tensor on the inputs' device."""
    if isinstance(bco_delta, torch.Tensor):
        if bco_delta.dim() != 0 or not bco_delta.dtype.is_floating_point:
            raise ValueError(
                f"{OP}: bco_delta must be a float or a 0-d float tensor, got a {bco_delta.dtype} "
                f"tensor of shape {tuple(bco_delta.shape)}"
            )
        _checks.check_same_device(OP, "policy_chosen", policy_chosen, bco_delta=bco_delta)
    elif not _checks.is_finite_number(bco_delta):
        raise ValueError(f"{OP}: bco_delta must be a finite float, got {bco_delta!r}")


def _check_lengths(policy_chosen, loss_types, chosen_lengths, rejected_lengths):
    """The completion token counts: present where a loss type needs them, [B] real tensors on the
    inputs' device."""
    lengths = {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
    for one_type in loss_types:
        for name in _NEEDS_LENGTHS.get(one_type, ()):
            if lengths[name] is None:
                raise ValueError(
                    f"{OP}: loss_type {one_type!r} needs {name} (completion token counts [B]) "
                    f"with summed log-probs, got None"
                )
    for name, tensor in lengths.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor) or tensor.dtype in (torch.bool, torch.complex64, torch.complex128):
            given = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"{OP}: {name} must be a tensor of token counts (integer or float), got {given}")
        _checks.check_shape(OP, name, tensor, tuple(policy_chosen.shape), "policy_chosen.shape")
        _checks.check_same_device(OP, "policy_chosen", policy_chosen, **{name: tensor})


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    *,
    loss_weights: Sequence[float] | None = None,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    discopop_tau: float = 0.05,
    bco_delta: float | torch.Tensor = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen_rewards, rejected_rewards): the (weighted) DPO loss and the detached rewards.

    ``chosen_lengths`` / ``rejected_lengths``: completion token counts [B], needed by ipo and
    sigmoid_norm (both) and sft (chosen). ``bco_delta``: the reward shift of bco_pair (0 = TRL 1.x).
    """
    _check_log_probs(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    loss_types = check_loss_options(beta, loss_type, label_smoothing, loss_weights, discopop_tau)
    _check_bco_delta(policy_chosen, bco_delta)
    _check_lengths(policy_chosen, loss_types, chosen_lengths, rejected_lengths)
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    chosen_logratio = policy_chosen - reference_chosen
    rejected_logratio = policy_rejected - reference_rejected
    loss = None
    for one_type, weight in zip(loss_types, weights):
        term = (
            _per_pair_loss(
                one_type,
                policy_chosen,
                policy_rejected,
                reference_chosen,
                reference_rejected,
                chosen_logratio,
                rejected_logratio,
                beta,
                label_smoothing,
                chosen_lengths,
                rejected_lengths,
                discopop_tau,
                bco_delta,
            ).mean()
            * weight
        )
        loss = term if loss is None else loss + term
    return loss, (beta * chosen_logratio).detach(), (beta * rejected_logratio).detach()


# The op is its own plain-PyTorch reference (a few elementwise ops on B numbers: no kernel to check
# against it), under the name every op's reference has; it checks its arguments like the op.
dpo_loss_ref = dpo_loss
