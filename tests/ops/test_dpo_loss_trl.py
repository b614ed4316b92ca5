"""Every DPO loss type against TRL 1.16's own loss code on the same log-probs.

tests/fixtures/trl/expected.json was written by tests/fixtures/trl/regenerate.py (TRL's
``DPOTrainer._compute_loss`` in float64 on per-token log-probs that are multiples of 2**-10, so the
summed inputs are exact in float32 too); CI only reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import solar_kernels as sk

EXPECTED = json.loads((Path(__file__).parents[1] / "fixtures" / "trl" / "expected.json").read_text())
CASES = EXPECTED["cases"]
# float64 agrees to rounding; float32 to its own arithmetic on exactly representable inputs.
RTOL = {torch.float64: 1e-10, torch.float32: 2e-6}
ATOL = {torch.float64: 1e-12, torch.float32: 1e-7}


def _tensor(values, dtype, requires_grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=requires_grad)


def _our_loss(case, dtype):
    policy_chosen = _tensor(case["policy_chosen"], dtype, requires_grad=True)
    policy_rejected = _tensor(case["policy_rejected"], dtype, requires_grad=True)
    loss, chosen_rewards, rejected_rewards = sk.dpo_loss(
        policy_chosen,
        policy_rejected,
        _tensor(case["reference_chosen"], dtype),
        _tensor(case["reference_rejected"], dtype),
        beta=case["beta"],
        loss_type=case["loss_type"],
        label_smoothing=case["label_smoothing"],
        loss_weights=case["loss_weights"],
        chosen_lengths=torch.tensor(case["chosen_lengths"]),
        rejected_lengths=torch.tensor(case["rejected_lengths"]),
        discopop_tau=case["discopop_tau"],
    )
    loss.backward()
    # sft alone never reads the rejected log-probs: no gradient reaches them (TRL's is 0 there)
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in (policy_chosen, policy_rejected)]
    return loss, chosen_rewards, rejected_rewards, *grads


def test_fixture_covers_every_loss_type():
    covered = {loss_type for case in CASES.values() for loss_type in case["loss_type"]}
    trl_types = set(sk.LOSS_TYPES) - {"cdpo"}  # cdpo is ours: TRL 1.x has no label-smoothed sigmoid
    assert covered == trl_types
    assert EXPECTED["trl"] == "1.16.0"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_trl(name, dtype):
    case = CASES[name]
    loss, chosen_rewards, rejected_rewards, grad_chosen, grad_rejected = _our_loss(case, dtype)
    assert loss.dtype == dtype
    rtol, atol = RTOL[dtype], ATOL[dtype]
    torch.testing.assert_close(loss.double(), torch.tensor(case["loss"], dtype=torch.float64), rtol=rtol, atol=atol)
    for ours, key in (
        (chosen_rewards, "chosen_rewards"),
        (rejected_rewards, "rejected_rewards"),
        (grad_chosen, "grad_policy_chosen"),
        (grad_rejected, "grad_policy_rejected"),
    ):
        torch.testing.assert_close(
            ours.double(),
            torch.tensor(case[key], dtype=torch.float64),
            rtol=rtol,
            atol=atol,
            msg=lambda m, key=key: f"{name} {key}: {m}",
        )


def test_cdpo_is_trl_028_sigmoid_with_label_smoothing():
    """cdpo = TRL <= 0.28's smoothed sigmoid; at eps = 0 it is TRL 1.16's sigmoid on the same pairs."""
    case = CASES["sigmoid"]
    inputs = [
        _tensor(case[k], torch.float64)
        for k in ("policy_chosen", "policy_rejected", "reference_chosen", "reference_rejected")
    ]
    plain = sk.dpo_loss(*inputs, beta=case["beta"], loss_type="cdpo")[0]
    assert plain.item() == pytest.approx(case["loss"], rel=1e-12)
    smoothed = sk.dpo_loss(*inputs, beta=case["beta"], loss_type="cdpo", label_smoothing=0.2)[0]
    h = (inputs[0] - inputs[2]) - (inputs[1] - inputs[3])
    logits = case["beta"] * h
    expected = (0.8 * torch.nn.functional.softplus(-logits) + 0.2 * torch.nn.functional.softplus(logits)).mean()
    assert smoothed.item() == pytest.approx(expected.item(), rel=1e-12)
