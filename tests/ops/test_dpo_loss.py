import math

import pytest
import torch

import solar_kernels as sk
from solar_kernels.ops.dpo_loss import dpo_loss_ref


def logsigmoid64(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def exact_losses(pc, pr, rc, rr, beta, loss_type, eps):
    """SPEC §5 per pair, in Python floats (float64), from the formulas alone."""
    out = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        h = (a - c) - (b - d)
        if loss_type == "sigmoid":
            out.append(-logsigmoid64(beta * h) * (1 - eps) - logsigmoid64(-beta * h) * eps)
        elif loss_type == "ipo":
            out.append((h - 1 / (2 * beta)) ** 2)
        elif loss_type == "hinge":
            out.append(max(0.0, 1 - beta * h))
        else:
            out.append((-(1 - eps) * logsigmoid64(beta * h) + eps * logsigmoid64(-beta * h)) / (1 - 2 * eps))
    return sum(out) / len(out)


@pytest.mark.parametrize(
    "loss_type, beta, eps",
    [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.1, 0.0), ("hinge", 0.3, 0.0), ("robust", 0.1, 0.1)],
)
def test_loss_and_rewards(loss_type, beta, eps):
    pc, pr, rc, rr = (torch.randn(7, dtype=torch.float64) * 20 - 50 for _ in range(4))
    loss, chosen, rejected = sk.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    assert loss.item() == pytest.approx(exact_losses(pc, pr, rc, rr, beta, loss_type, eps), rel=1e-12)
    torch.testing.assert_close(chosen, beta * (pc - rc))
    torch.testing.assert_close(rejected, beta * (pr - rr))
    assert not chosen.requires_grad and not rejected.requires_grad


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_gradient_flows_to_policy_only(loss_type):
    pc, pr = (torch.randn(5, requires_grad=True) for _ in range(2))
    rc, rr = torch.randn(5), torch.randn(5)
    loss, _, _ = sk.dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type=loss_type,
                             label_smoothing=0.1 if loss_type in ("sigmoid", "robust") else 0.0)
    loss.backward()
    # d loss / d pi_c = -d loss / d pi_r for every pair-level loss of h = (pc - rc) - (pr - rr)
    torch.testing.assert_close(pc.grad, -pr.grad)
    # float64 finite difference on the first pair
    pc64, pr64, rc64, rr64 = (t.detach().double() for t in (pc, pr, rc, rr))
    step = 1e-6
    bump = torch.zeros(5, dtype=torch.float64)
    bump[0] = step
    kwargs = dict(beta=0.2, loss_type=loss_type, label_smoothing=0.1 if loss_type in ("sigmoid", "robust") else 0.0)
    up = dpo_loss_ref(pc64 + bump, pr64, rc64, rr64, **kwargs)[0]
    down = dpo_loss_ref(pc64 - bump, pr64, rc64, rr64, **kwargs)[0]
    assert pc.grad[0].item() == pytest.approx(((up - down) / (2 * step)).item(), rel=1e-3, abs=1e-6)


def test_matches_trl_sigmoid_convention():
    """Chosen clearly better than rejected under the policy: loss below log 2, accuracy 1."""
    pc, pr = torch.tensor([-10.0, -12.0]), torch.tensor([-30.0, -25.0])
    rc, rr = torch.tensor([-20.0, -20.0]), torch.tensor([-20.0, -20.0])
    loss, chosen, rejected = sk.dpo_loss(pc, pr, rc, rr)
    assert loss.item() < math.log(2)
    assert (chosen > rejected).all()
    same = sk.dpo_loss(rc, rr, rc, rr)[0]
    assert same.item() == pytest.approx(math.log(2))


def _inputs():
    return [torch.randn(4) for _ in range(4)]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(loss_type="kto"), ValueError, "loss_type must be one of .*got 'kto'"),
        (dict(beta=0.0), ValueError, "beta must be a positive float, got 0.0"),
        (dict(label_smoothing=0.5), ValueError, r"label_smoothing must be in \[0, 0.5\), got 0.5"),
        (dict(loss_type="ipo", label_smoothing=0.1), ValueError, "used by the sigmoid and robust losses only"),
        (dict(backend="nope"), ValueError, "backend must be one of"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        sk.dpo_loss(*_inputs(), **kwargs)


def test_bad_tensors():
    a, b, c, d = _inputs()
    with pytest.raises(ValueError, match=r"reference_rejected has shape \(3,\), expected \(4,\)"):
        sk.dpo_loss(a, b, c, torch.randn(3))
    with pytest.raises(TypeError, match="policy_rejected has dtype torch.float64, expected torch.float32"):
        sk.dpo_loss(a, b.double(), c, d)
    with pytest.raises(TypeError, match="reference_chosen must be float32, float16, bfloat16 or float64, got torch.int64"):
        sk.dpo_loss(a, b, torch.ones(4, dtype=torch.long), d)
    with pytest.raises(ValueError, match="policy_chosen must not be empty"):
        sk.dpo_loss(*(torch.randn(0) for _ in range(4)))
