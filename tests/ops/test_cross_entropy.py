"""cross_entropy (logits level) and linear_cross_entropy's options against Liger-Kernel 0.8.5's
own outputs (tests/fixtures/liger/cross_entropy.safetensors), against torch.nn.functional's
cross-entropy, and against a float64 computation; plus the refusals and bad-input errors."""

from __future__ import annotations

import importlib

import pytest
import torch

import solar_kernels as sk
from solar_kernels.ops import _registry
from solar_kernels.ops.cross_entropy import cross_entropy_ref
from tests.fixtures.liger import load_cases
from tests.helpers import IGNORE, assert_compiles_like_eager, exact_cross_entropy, options_backend
from tests.tolerances import DTYPE_IDS, DTYPES, FLOOR, assert_close, rel_err

LIGER = load_cases("cross_entropy.safetensors")
OPTION_NAMES = ("label_smoothing", "lse_square_scale", "return_z_loss", "softcap", "return_token_accuracy")


def loss_of(out):
    return out if isinstance(out, torch.Tensor) else out.loss


def grads_of(fn, leaves, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    grads = torch.autograd.grad(loss_of(out), leaves, upstream.to(loss_of(out).dtype))
    return out, grads


def make_logits(rows, vocab, dtype, device, ignore_share=0.3, scale=3.0):
    logits = (torch.randn(rows, vocab, device=device) * scale).to(dtype)
    labels = torch.randint(0, vocab, (rows,), device=device)
    labels[torch.rand(rows, device=device) < ignore_share] = IGNORE
    labels[0] = IGNORE
    labels[1] = vocab - 1
    return logits, labels


# -- Liger-Kernel 0.8.5 parity (fixture) ------------------------------------------------------------


def _liger_call(options, tensors, backend):
    kwargs = {k: v for k, v in options["options"].items() if k in OPTION_NAMES}
    reduction = options["reduction"]
    ce_weight = tensors.get("ce_weight")
    labels = tensors["labels"]
    if options["op"] == "ce":
        leaves = [tensors["logits"]]

        def fn(z):
            return sk.cross_entropy(z, labels, weight=ce_weight, reduction=reduction, backend=backend, **kwargs)

        names = ["dlogits"]
    else:
        leaves = [tensors["hidden"], tensors["weight"]] + ([tensors["bias"]] if "bias" in tensors else [])
        names = ["dhidden", "dweight", "dbias"][: len(leaves)]

        def fn(h, w, b=None):
            return sk.linear_cross_entropy(
                h, w, labels, bias=b, ce_weight=ce_weight, reduction=reduction, backend=backend, **kwargs
            )

    return fn, leaves, names


def _exact_liger_case(options, tensors):
    """float64 loss and gradients of a fixture case, for judging both sides."""
    kwargs = {k: v for k, v in options["options"].items() if k in OPTION_NAMES}
    leaves = [
        t.double().requires_grad_()
        for t in (
            [tensors["logits"]]
            if options["op"] == "ce"
            else [tensors["hidden"], tensors["weight"]] + ([tensors["bias"]] if "bias" in tensors else [])
        )
    ]
    logits64 = leaves[0] if options["op"] == "ce" else torch.nn.functional.linear(*leaves)
    loss = exact_cross_entropy(
        logits64, tensors["labels"], options["reduction"], weight=tensors.get("ce_weight"), **kwargs
    )
    return loss.detach(), torch.autograd.grad(loss, leaves, tensors["upstream"].double())


@pytest.mark.parametrize("case", sorted(LIGER))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_liger(case, backend):
    """Loss, z-loss, token accuracy and every gradient as Liger 0.8.5 gives them: ours within 2x
    Liger's own error against float64 (plus the dtype's floor) and near Liger's values."""
    options, tensors = LIGER[case]
    dtype = tensors["logits" if options["op"] == "ce" else "hidden"].dtype
    fn, leaves, names = _liger_call(options, tensors, backend)
    out, grads = grads_of(fn, leaves, tensors["upstream"])
    loss_exact, grads_exact = _exact_liger_case(options, tensors)
    # The logits op returns the logits' dtype, the fused op fp32 (Liger: fp32 fused, logits' dtype).
    assert loss_of(out).dtype == (dtype if options["op"] == "ce" else torch.float32)
    assert_close("loss", loss_of(out), tensors["loss"], loss_exact, dtype)
    for name, ours, exact_grad in zip(names, grads, grads_exact):
        assert ours.dtype == tensors[name].dtype
        assert_close(name, ours, tensors[name], exact_grad, dtype)
    flags = options["options"]
    assert isinstance(out, torch.Tensor) == (not flags.get("return_z_loss") and not flags.get("return_token_accuracy"))
    if flags.get("return_z_loss"):
        assert rel_err(out.z_loss, tensors["z_loss"]) <= 2 * FLOOR[dtype]
        assert not out.z_loss.requires_grad
    if flags.get("return_token_accuracy"):
        assert out.token_accuracy.dtype == torch.float32
        assert torch.equal(out.token_accuracy, tensors["token_accuracy"])


def test_liger_fixture_covers_every_option():
    """The fixture is the one the regenerating script writes: every option alone and together, both
    ops, both reductions' kinds, fp32 and bf16."""
    seen = {(o["op"], o["dtype"], name) for o, _ in LIGER.values() for name in o["options"]}
    for op in ("ce", "flce"):
        for dtype in ("fp32", "bf16"):
            for name in (*OPTION_NAMES, "ce_weight"):
                assert (op, dtype, name) in seen
    assert {o["reduction"] for o, _ in LIGER.values()} == {"mean", "sum", "none"}
    accuracies = [t["token_accuracy"] for o, t in LIGER.values() if o["reduction"] != "none" and "token_accuracy" in t]
    assert accuracies and all(0 < a < 1 for a in accuracies)


# -- cross_entropy against torch.nn.functional.cross_entropy ----------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "torch_options",
    [{}, {"label_smoothing": 0.15}, {"weight": True}, {"weight": True, "label_smoothing": 0.3}],
    ids=["plain", "smooth", "weight", "weight_smooth"],
)
def test_matches_torch_cross_entropy(torch_options, reduction, device, any_backend):
    """fp32: the loss and d/d logits of F.cross_entropy itself, on non-contiguous logits."""
    logits, labels = make_logits(19, 201, torch.float32, device)
    logits = torch.randn(201, 19, device=device).t() * 3  # [N, V] column-major view
    options = dict(torch_options)
    if options.get("weight"):
        options["weight"] = torch.rand(201, device=device) + 0.2
    upstream = torch.randn(labels.shape if reduction == "none" else (), device=device)
    backend = options_backend(any_backend)
    out, grads = grads_of(
        lambda z: sk.cross_entropy(z, labels, reduction=reduction, backend=backend, **options), [logits], upstream
    )
    expected, expected_grads = grads_of(
        lambda z: torch.nn.functional.cross_entropy(z, labels, ignore_index=IGNORE, reduction=reduction, **options),
        [logits],
        upstream,
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], expected_grads[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(7, 4097), (23, 123), (2, 2)])
def test_every_dtype_against_float64(shape, dtype, device, any_backend):
    """Every option at once, several vocabulary tiles (4097 > the kernel's 4096 columns): loss and
    gradient within 2x eager PyTorch's error against float64."""
    logits, labels = make_logits(*shape, dtype, device, ignore_share=0.2)
    weight = torch.rand(shape[1], device=device) + 0.5
    options = dict(label_smoothing=0.1, lse_square_scale=1e-2, softcap=4.0, weight=weight)
    upstream = torch.tensor(0.8, device=device)
    backend = options_backend(any_backend)
    out, grads = grads_of(lambda z: sk.cross_entropy(z, labels, backend=backend, **options), [logits], upstream)
    eager, eager_grads = grads_of(lambda z: cross_entropy_ref(z, labels, **options), [logits], upstream)
    loss64, grads64 = grads_of(
        lambda z: exact_cross_entropy(z, labels, **options), [logits.double()], upstream.double()
    )
    assert out.dtype == dtype and grads[0].dtype == dtype
    assert_close("loss", out, eager, loss64, dtype)
    assert_close("dlogits", grads[0], eager_grads[0], grads64[0], dtype)


@pytest.mark.parametrize("option", ["label_smoothing", "lse_square_scale", "softcap", "weight", "accuracy"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_each_option_alone(option, reduction, device, any_backend):
    logits, labels = make_logits(11, 77, torch.float32, device)
    options = {
        "label_smoothing": dict(label_smoothing=0.25),
        "lse_square_scale": dict(lse_square_scale=0.05, return_z_loss=True),
        "softcap": dict(softcap=2.0),
        "weight": dict(weight=torch.rand(77, device=device)),
        "accuracy": dict(return_token_accuracy=True),
    }[option]
    upstream = torch.randn(labels.shape if reduction == "none" else (), device=device)
    backend = options_backend(any_backend)
    out, grads = grads_of(
        lambda z: sk.cross_entropy(z, labels, reduction=reduction, backend=backend, **options), [logits], upstream
    )
    ref, ref_grads = grads_of(
        lambda z: cross_entropy_ref(z, labels, reduction=reduction, **options), [logits], upstream
    )
    torch.testing.assert_close(loss_of(out), loss_of(ref), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-5, atol=1e-7)
    if option == "lse_square_scale":
        torch.testing.assert_close(out.z_loss, ref.z_loss)
        assert out.token_accuracy is None and (out.z_loss > 0).any()
    if option == "accuracy":
        expected = (logits.argmax(-1) == labels).float()[labels != IGNORE]
        assert torch.equal(out.token_accuracy, ref.token_accuracy)
        if reduction != "none":
            torch.testing.assert_close(out.token_accuracy, expected.mean())
        assert out.z_loss is None


def test_accuracy_takes_the_first_largest_logit(device, any_backend):
    """Ties go to the first column, as torch.argmax and Liger; an argmax in a later vocabulary tile
    counts (5000 columns: two tiles)."""
    logits = torch.zeros(3, 5000, device=device)
    logits[0, [3, 7]] = 5.0  # tie: column 3 wins
    logits[1, 4500] = 2.0  # in the second tile
    logits[2, [10, 4999]] = 1.0
    labels = torch.tensor([7, 4500, 10], device=device)
    out = sk.cross_entropy(
        logits, labels, reduction="none", return_token_accuracy=True, backend=options_backend(any_backend)
    )
    assert out.token_accuracy.tolist() == [0.0, 1.0, 1.0]


def test_all_ignored_and_zero_weights(device, any_backend):
    """n = 0: loss and z-loss 0 (PyTorch: NaN), accuracy NaN (as Liger); gradients exactly 0."""
    logits, labels = make_logits(5, 30, torch.float32, device)
    labels.fill_(IGNORE)
    z = logits.clone().requires_grad_()
    out = sk.cross_entropy(
        z,
        labels,
        label_smoothing=0.1,
        lse_square_scale=0.1,
        return_z_loss=True,
        return_token_accuracy=True,
        backend=options_backend(any_backend),
    )
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.z_loss.item() == 0.0 and torch.isnan(out.token_accuracy)
    assert torch.count_nonzero(z.grad) == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logits_are_never_written(dtype, backend, device):
    """Liger overwrites its input logits with their gradient; ours leaves them as they were."""
    logits, labels = make_logits(9, 50, dtype, device)
    z = logits.clone().requires_grad_()
    sk.cross_entropy(z, labels, softcap=3.0, label_smoothing=0.1, backend=backend).backward()
    assert torch.equal(z.detach(), logits) and z.grad is not None


def test_torch_compile_fullgraph(device, any_backend):
    logits, labels = make_logits(6, 40, torch.float32, device)
    weight = torch.rand(40, device=device)

    def f(z):
        out = sk.cross_entropy(
            z,
            labels,
            label_smoothing=0.1,
            softcap=5.0,
            weight=weight,
            lse_square_scale=1e-2,
            return_z_loss=True,
            backend=options_backend(any_backend),
        )
        return out.loss * 2 + out.z_loss

    assert_compiles_like_eager(f, logits.clone().requires_grad_())


# -- refusals and bad input ----------------------------------------------------------------------


def test_cuda_backend_refuses_the_options(monkeypatch):
    """The CUDA kernel has only the plain loss: an explicit "cuda" (argument or environment) is
    refused, naming the options and the backends that have them; "auto" that resolved to CUDA
    alone runs the torch backend; the plain call keeps CUDA."""
    module = importlib.import_module("solar_kernels.ops.linear_logprobs")
    refusal = r"softcap, ce_weight not implemented by backend 'cuda' .*'triton', 'torch' and 'auto'"
    with pytest.raises(RuntimeError, match=refusal):
        module.backend_for_options("linear_cross_entropy", "cuda", "cuda", ["softcap", "ce_weight"])
    monkeypatch.setenv("SOLAR_KERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="label_smoothing not implemented by backend 'cuda'"):
        module.backend_for_options("cross_entropy", "cuda", None, ["label_smoothing"])
    monkeypatch.delenv("SOLAR_KERNELS_BACKEND")
    assert module.backend_for_options("cross_entropy", "cuda", None, ["softcap"]) == "torch"
    assert module.backend_for_options("cross_entropy", "cuda", "auto", ["softcap"]) == "torch"
    assert module.backend_for_options("cross_entropy", "cuda", "cuda", []) == "cuda"
    assert module.backend_for_options("cross_entropy", "triton", "triton", ["softcap"]) == "triton"
    rows = module.RowOptions(softcap=2.0)
    monkeypatch.setattr(_registry, "pick", lambda *args: "cuda")  # "auto" on a GPU choosing CUDA
    assert module.row_backend("auto", 8, 100, torch.device("cpu"), rows) == "triton"
    assert module.row_backend("auto", 8, 100, torch.device("cpu"), module.RowOptions()) == "cuda"


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_refusal_comes_before_any_work(op, monkeypatch):
    """Where the resolved backend is CUDA, the options are refused before a kernel runs."""
    module = importlib.import_module("solar_kernels.ops.linear_logprobs")
    target = importlib.import_module("solar_kernels.ops.cross_entropy") if op == "cross_entropy" else module
    monkeypatch.setattr(module, "resolve_backend", lambda *args: "cuda")  # both resolve in check_ce_call
    monkeypatch.setattr(module, "_logprobs_rows", lambda *a, **k: pytest.fail("a kernel ran"))
    monkeypatch.setattr(target, "_logprobs_rows", lambda *a, **k: pytest.fail("a kernel ran"), raising=False)
    args = (
        (torch.randn(4, 10), torch.randint(0, 10, (4,)))
        if op == "cross_entropy"
        else (torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,)))
    )
    with pytest.raises(RuntimeError, match="return_token_accuracy not implemented by backend 'cuda'"):
        getattr(sk, op)(*args, return_token_accuracy=True, backend="cuda")


def _bad(op, **overrides):
    if op == "cross_entropy":
        args = dict(logits=torch.randn(6, 20), labels=torch.randint(0, 20, (6,)))
        weight_name = "weight"
    else:
        args = dict(hidden=torch.randn(6, 8), weight=torch.randn(20, 8), labels=torch.randint(0, 20, (6,)))
        weight_name = "ce_weight"
    if "class_weight" in overrides:
        overrides[weight_name] = overrides.pop("class_weight")
    args.update(overrides)
    return getattr(sk, op)(**args)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be a float in \[0, 1\], got 1.5"),
        (dict(label_smoothing=-0.1), ValueError, r"label_smoothing must be a float in \[0, 1\], got -0.1"),
        (dict(label_smoothing=True), ValueError, r"label_smoothing must be a float in \[0, 1\], got True"),
        (dict(lse_square_scale=-1e-4), ValueError, "lse_square_scale must be a finite float >= 0, got -0.0001"),
        (dict(softcap=0.0), ValueError, "softcap must be None or a finite float > 0, got 0.0"),
        (dict(softcap=-30), ValueError, "softcap must be None or a finite float > 0, got -30"),
        (dict(softcap=float("inf")), ValueError, "softcap must be None or a finite float > 0, got inf"),
        (dict(return_z_loss="yes"), TypeError, "return_z_loss must be True or False, got 'yes'"),
        (dict(return_token_accuracy=1), TypeError, "return_token_accuracy must be True or False, got 1"),
        (
            dict(class_weight=torch.rand(19)),
            ValueError,
            r"weight has shape \(19,\), expected \(20,\) \(one weight per class\)",
        ),
        (
            dict(class_weight=torch.ones(20, dtype=torch.long)),
            TypeError,
            "weight must be float32, float16, bfloat16 or float64, got torch.int64",
        ),
        (dict(class_weight=torch.rand(20, device="meta")), ValueError, "weight is on meta, expected cpu"),
        (
            dict(class_weight=torch.rand(20, requires_grad=True)),
            ValueError,
            "weight requires grad, expected a constant",
        ),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
    ],
)
@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_bad_options(op, overrides, error, message):
    with pytest.raises(error, match=message):
        _bad(op, **overrides)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(logits=torch.randn(2, 3, 20)), ValueError, "logits must have 2 dimensions, got 3"),
        (
            dict(logits=torch.randn(6, 20).double()),
            TypeError,
            "logits must be float32, float16 or bfloat16, got torch.float64",
        ),
        (
            dict(labels=torch.randint(0, 20, (5,))),
            ValueError,
            r"labels has shape \(5,\), expected \(6,\) \(logits.shape\[0\]\)",
        ),
        (dict(labels=torch.rand(6)), TypeError, "labels must be int64 or int32, got torch.float32"),
        (dict(labels=torch.tensor([0, 1, 2, 20, 4, 5])), ValueError, r"labels\[3\] = 20 is outside \[0, 20\)"),
        (dict(ignore_index=None), TypeError, "ignore_index must be an int"),
        (dict(backend="jax"), ValueError, "backend must be one of"),
    ],
)
def test_bad_logits_input(overrides, error, message):
    with pytest.raises(error, match=message):
        _bad("cross_entropy", **overrides)


@pytest.mark.gpu
def test_cuda_backend_on_gpu():
    """On a GPU the CUDA kernel runs the plain loss and refuses an option."""
    logits, labels = make_logits(9, 300, torch.float32, "cuda")
    torch.testing.assert_close(sk.cross_entropy(logits, labels, backend="cuda"), cross_entropy_ref(logits, labels))
    with pytest.raises(RuntimeError, match="softcap not implemented by backend 'cuda'"):
        sk.cross_entropy(logits, labels, softcap=3.0, backend="cuda")
    torch.testing.assert_close(
        sk.cross_entropy(logits, labels, softcap=3.0, backend="auto"), cross_entropy_ref(logits, labels, softcap=3.0)
    )
