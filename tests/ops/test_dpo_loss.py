from __future__ import annotations

import math
import sys

import pytest
import torch

import solar_kernels as sk
from solar_kernels.ops.dpo_loss import dpo_loss_ref


def logsigmoid64(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def exact_losses(pc, pr, rc, rr, beta, loss_type, eps):
    """docs/method.md#dpo-loss-types per pair, in Python floats (float64), from the formulas alone."""
    out = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        h = (a - c) - (b - d)
        if loss_type == "cdpo":
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
    [("cdpo", 0.1, 0.0), ("cdpo", 0.5, 0.2), ("ipo", 0.1, 0.0), ("hinge", 0.3, 0.0), ("robust", 0.1, 0.1)],
)
def test_loss_and_rewards(loss_type, beta, eps):
    pc, pr, rc, rr = (torch.randn(7, dtype=torch.float64) * 20 - 50 for _ in range(4))
    ones = torch.ones(7, dtype=torch.long)  # ipo averages per token: one token each keeps SPEC's formula
    loss, chosen, rejected = sk.dpo_loss(
        pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps, chosen_lengths=ones, rejected_lengths=ones
    )
    assert loss.item() == pytest.approx(exact_losses(pc, pr, rc, rr, beta, loss_type, eps), rel=1e-12)
    torch.testing.assert_close(chosen, beta * (pc - rc))
    torch.testing.assert_close(rejected, beta * (pr - rr))
    assert not chosen.requires_grad and not rejected.requires_grad


@pytest.mark.parametrize("loss_type", ["sigmoid", "cdpo", "ipo", "hinge", "robust"])
def test_gradient_flows_to_policy_only(loss_type):
    pc, pr = (torch.randn(5, requires_grad=True) for _ in range(2))
    rc, rr = torch.randn(5), torch.randn(5)
    lengths = torch.full((5,), 3)
    kwargs = dict(
        beta=0.2,
        loss_type=loss_type,
        label_smoothing=0.1 if loss_type in ("cdpo", "robust") else 0.0,
        chosen_lengths=lengths,
        rejected_lengths=lengths,
    )
    loss, _, _ = sk.dpo_loss(pc, pr, rc, rr, **kwargs)
    loss.backward()
    # d loss / d pi_c = -d loss / d pi_r for every pair-level loss of h = (pc - rc) - (pr - rr)
    torch.testing.assert_close(pc.grad, -pr.grad)
    # float64 finite difference on the first pair
    pc64, pr64, rc64, rr64 = (t.detach().double() for t in (pc, pr, rc, rr))
    step = 1e-6
    bump = torch.zeros(5, dtype=torch.float64)
    bump[0] = step
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
        (
            dict(loss_type="ipo", label_smoothing=0.1),
            ValueError,
            "used by the cdpo, robust, exo_pair, aot, aot_unpaired losses only",
        ),
        (
            dict(label_smoothing=0.1),
            ValueError,
            "'sigmoid' ignores label_smoothing .*use loss_type='cdpo', got label_smoothing=0.1",
        ),
        (dict(loss_type=["hinge", "sigmoid"], label_smoothing=0.1), ValueError, "use loss_type='cdpo'"),
        (dict(loss_type="aot_pair"), ValueError, "'aot_pair' is TRL 0.x's name; .* 'aot_unpaired'"),
        (dict(loss_type=["sigmoid", "kto"]), ValueError, "loss_type must be one of .*got 'kto'"),
        (dict(loss_type=[]), ValueError, "loss_type must be a loss type name or a non-empty list of them, got \\[\\]"),
        (
            dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]),
            ValueError,
            r"loss_weights has 1 entries, expected 2 \(one per loss_type \['sigmoid', 'sft'\]\)",
        ),
        (dict(loss_weights=[float("nan")]), ValueError, r"loss_weights must be finite floats, got \[nan\]"),
        (dict(loss_weights=0.5), ValueError, "loss_weights must be a list of floats, got 0.5"),
        (dict(loss_type="ipo"), ValueError, r"'ipo' needs chosen_lengths \(completion token counts \[B\]\).*got None"),
        (
            dict(loss_type="sigmoid_norm", chosen_lengths=torch.ones(4)),
            ValueError,
            "'sigmoid_norm' needs rejected_lengths",
        ),
        (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]), ValueError, "'sft' needs chosen_lengths"),
        (
            dict(loss_type="sft", chosen_lengths=torch.ones(3)),
            ValueError,
            r"chosen_lengths has shape \(3,\), expected \(4,\)",
        ),
        (
            dict(loss_type="sft", chosen_lengths=[1, 2, 3, 4]),
            TypeError,
            "chosen_lengths must be a tensor of token counts",
        ),
        (dict(loss_type="exo_pair"), ValueError, r"'exo_pair' needs label_smoothing in \(0, 0.5\).*got 0.0"),
        (dict(loss_type="discopop", discopop_tau=0.0), ValueError, "discopop_tau must be a positive float, got 0.0"),
        (
            dict(loss_type="bco_pair", bco_delta=torch.zeros(2)),
            ValueError,
            "bco_delta must be a float or a 0-d float tensor",
        ),
        (dict(loss_type="bco_pair", bco_delta=float("inf")), ValueError, "bco_delta must be a finite float, got inf"),
        (dict(backend="torch"), TypeError, "unexpected keyword argument 'backend'"),
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
    with pytest.raises(
        TypeError, match="reference_chosen must be float32, float16, bfloat16 or float64, got torch.int64"
    ):
        sk.dpo_loss(a, b, torch.ones(4, dtype=torch.long), d)
    with pytest.raises(ValueError, match="policy_chosen must not be empty"):
        sk.dpo_loss(*(torch.randn(0) for _ in range(4)))


def test_bad_arguments_raise_before_any_work(monkeypatch):
    """A bad argument is refused before the reference runs (nothing half-computed)."""
    module = sys.modules["solar_kernels.ops.dpo_loss"]  # the package attribute is the function

    def must_not_run(*args, **kwargs):
        raise AssertionError("the loss ran before the arguments were checked")

    monkeypatch.setattr(module, "_per_pair_loss", must_not_run)
    with pytest.raises(ValueError, match="'ipo' needs chosen_lengths"):
        module.dpo_loss(*_inputs(), loss_type=["sigmoid", "ipo"])


def test_reference_is_the_checked_op():
    """The op is its own reference: ``dpo_loss_ref`` refuses what ``dpo_loss`` refuses (an unknown
    loss type once fell through to the sft formula there): it is the op."""
    inputs, lengths = _inputs(), torch.full((4,), 3)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        sk.dpo_loss_ref(*inputs, loss_type="simpo", chosen_lengths=lengths)
    assert sk.dpo_loss_ref is sk.dpo_loss


def test_loss_weights_combine_the_means():
    pc, pr, rc, rr = (torch.randn(6, dtype=torch.float64) * 5 - 20 for _ in range(4))
    lengths_c, lengths_r = torch.randint(1, 30, (6,)), torch.randint(1, 30, (6,))
    common = dict(beta=0.2, chosen_lengths=lengths_c, rejected_lengths=lengths_r)
    alone = {t: sk.dpo_loss(pc, pr, rc, rr, loss_type=t, **common)[0].item() for t in ("nca_pair", "ipo", "sft")}
    combined, chosen, rejected = sk.dpo_loss(
        pc, pr, rc, rr, loss_type=["nca_pair", "ipo", "sft"], loss_weights=[0.25, 2.0, -1.5], **common
    )
    expected = 0.25 * alone["nca_pair"] + 2.0 * alone["ipo"] - 1.5 * alone["sft"]
    assert combined.item() == pytest.approx(expected, rel=1e-12)
    unweighted = sk.dpo_loss(pc, pr, rc, rr, loss_type=["nca_pair", "ipo"], **common)[0]
    assert unweighted.item() == pytest.approx(alone["nca_pair"] + alone["ipo"], rel=1e-12)
    # rewards are the summed log-ratios whatever the loss (TRL 1.x), ipo included
    torch.testing.assert_close(chosen, 0.2 * (pc - rc))
    torch.testing.assert_close(rejected, 0.2 * (pr - rr))


def test_sft_is_the_token_mean_nll_of_the_chosen():
    pc = torch.tensor([-6.0, -1.0, -9.0], dtype=torch.float64, requires_grad=True)
    others = [torch.randn(3, dtype=torch.float64) for _ in range(3)]
    lengths = torch.tensor([3, 1, 4])
    loss = sk.dpo_loss(pc, *others, loss_type="sft", chosen_lengths=lengths)[0]
    assert loss.item() == pytest.approx(16.0 / 8)
    loss.backward()
    torch.testing.assert_close(pc.grad, torch.full((3,), -1.0 / 8, dtype=torch.float64))


def test_bco_delta_shifts_both_rewards():
    """TRL 0.x's bco_pair: both rewards minus a running mean, carried here by the caller."""
    pc, pr, rc, rr = (torch.randn(5, dtype=torch.float64) * 10 for _ in range(4))
    beta, delta = 0.1, 0.37
    expected = (
        sum(
            -logsigmoid64(beta * (a - c) - delta) - logsigmoid64(-(beta * (b - d) - delta))
            for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())
        )
        / 5
    )
    shifted = sk.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="bco_pair", bco_delta=delta)[0]
    assert shifted.item() == pytest.approx(expected, rel=1e-12)
    as_tensor = sk.dpo_loss(
        pc, pr, rc, rr, beta=beta, loss_type="bco_pair", bco_delta=torch.tensor(delta, dtype=torch.float64)
    )[0]
    assert as_tensor.item() == pytest.approx(expected, rel=1e-12)


def test_check_loss_options_without_tensors():
    """A config validates its DPO options before any model exists, with the op's own messages."""
    from solar_kernels.ops.dpo_loss import check_loss_options

    assert check_loss_options(0.1, "ipo") == ["ipo"]
    assert check_loss_options(0.1, ("sigmoid", "sft"), 0.0, [1.0, 0.5]) == ["sigmoid", "sft"]
    with pytest.raises(ValueError, match="use loss_type='cdpo'"):
        check_loss_options(0.1, "sigmoid", 0.1)
    with pytest.raises(ValueError, match="loss_weights has 3 entries, expected 1"):
        check_loss_options(0.1, "sigmoid", 0.0, [1.0, 1.0, 1.0])


def test_lengths_any_real_dtype_same_device():
    pc, pr, rc, rr = (torch.randn(4, dtype=torch.float64) for _ in range(4))

    def ipo_loss(lengths_dtype):
        chosen = torch.tensor([1, 2, 3, 4], dtype=lengths_dtype)
        rejected = torch.tensor([4, 3, 2, 1], dtype=lengths_dtype)
        return sk.dpo_loss(pc, pr, rc, rr, loss_type="ipo", chosen_lengths=chosen, rejected_lengths=rejected)[0]

    assert ipo_loss(torch.int64).item() == ipo_loss(torch.float32).item()
    with pytest.raises(TypeError, match="rejected_lengths must be a tensor of token counts .*got torch.bool"):
        sk.dpo_loss(pc, pr, rc, rr, loss_type="ipo", chosen_lengths=torch.ones(4), rejected_lengths=torch.ones(4) > 0)
    with pytest.raises(ValueError, match="chosen_lengths is on meta, expected cpu"):
        sk.dpo_loss(pc, pr, rc, rr, loss_type="sft", chosen_lengths=torch.ones(4, device="meta"))
