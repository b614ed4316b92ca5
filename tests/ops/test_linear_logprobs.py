from __future__ import annotations

import importlib

import pytest
import torch
from torch._library.custom_ops import _maybe_get_opdef
from torch.utils._python_dispatch import TorchDispatchMode

import solar_kernels as sk
from solar_kernels.ops.linear_logprobs import (
    default_chunk_rows,
    linear_cross_entropy_ref,
    linear_logprobs_ref,
    sequence_logprobs_ref,
)
from tests.helpers import (
    IGNORE,
    assert_compiles_like_eager,
    check_logprobs,
    exact_cross_entropy,
    exact_logprobs,
    options_backend,
)
from tests.helpers import check_lm_head as check
from tests.helpers import make_lm_head as make
from tests.tolerances import DTYPE_IDS, DTYPES


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "tokens_shape, d, vocab",
    [((37,), 64, 512), ((2, 9), 33, 123), ((1,), 16, 7), ((6,), 16, 32000), ((5,), 4096, 64), ((3, 4), 24, 4097)],
)
def test_logprobs_match_reference(tokens_shape, d, vocab, dtype, device, any_backend):
    check_logprobs(*make(tokens_shape, d, vocab, dtype, device), backend=any_backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_logprobs_with_bias(dtype, device, any_backend):
    check_logprobs(*make((19,), 40, 300, dtype, device, bias=True), backend=any_backend)


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_chunk_size_does_not_change_the_result(chunk_size, device, any_backend):
    check_logprobs(*make((23,), 32, 200, torch.float32, device), chunk_size=chunk_size, backend=any_backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_non_contiguous_inputs(dtype, device, any_backend):
    hidden, weight, bias, labels = make((2, 11), 48, 160, dtype, device, bias=True)
    hidden = torch.randn(2, 48, 11, dtype=dtype, device=device).transpose(1, 2)  # [B, T, d] view
    weight = weight.t().contiguous().t()  # [V, d] with column-major strides
    labels = torch.randint(0, 160, (11, 2), device=device).t()
    bias = torch.randn(320, dtype=dtype, device=device)[::2]
    check_logprobs(hidden, weight, bias, labels, backend=any_backend)


def test_int32_labels(device, any_backend):
    hidden, weight, _, labels = make((12,), 16, 50, torch.float32, device)
    check_logprobs(hidden, weight, None, labels.int(), backend=any_backend)


def test_all_tokens_ignored(device, any_backend):
    hidden, weight, bias, labels = make((9,), 16, 40, torch.bfloat16, device, bias=True)
    labels.fill_(IGNORE)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    logp = sk.linear_logprobs(h, w, labels, bias=b, backend=any_backend)
    assert torch.equal(logp, torch.zeros(9, device=device))
    logp.backward(torch.randn(9, device=device))
    for grad in (h.grad, w.grad, b.grad):
        assert torch.count_nonzero(grad) == 0
    loss = sk.linear_cross_entropy(h, w, labels, bias=b, backend=any_backend)
    assert loss.item() == 0.0
    assert (
        sk.sequence_logprobs(h.view(3, 3, 16), w, labels.view(3, 3), average=True, backend=any_backend).abs().sum() == 0
    )


def test_ignored_tokens_get_exactly_zero_gradient(device, any_backend):
    hidden, weight, _, labels = make((16,), 24, 90, torch.float32, device, ignore_share=0.5)
    h = hidden.clone().requires_grad_()
    sk.linear_logprobs(h, weight, labels, backend=any_backend).backward(torch.randn(16, device=device))
    ignored = labels == IGNORE
    assert ignored.any() and (~ignored).any()
    assert torch.count_nonzero(h.grad[ignored]) == 0
    assert (h.grad[~ignored].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy(reduction, dtype, device, any_backend):
    hidden, weight, bias, labels = make((3, 13), 40, 257, dtype, device, bias=True)
    upstream = torch.randn(labels.shape if reduction == "none" else (), device=device)

    def exact(h, w, y, b):
        nll = -exact_logprobs(h, w, y, b)
        if reduction == "none":
            return nll
        return nll.sum() / ((y != IGNORE).sum() if reduction == "mean" else 1)

    check(
        lambda h, w, y, b: sk.linear_cross_entropy(h, w, y, bias=b, reduction=reduction, backend=any_backend),
        lambda h, w, y, b: linear_cross_entropy_ref(h, w, y, b, reduction=reduction),
        exact,
        hidden,
        weight,
        bias,
        labels,
        upstream,
    )


def test_cross_entropy_matches_torch_and_partial_grads(device, any_backend):
    hidden, weight, _, labels = make((31,), 20, 77, torch.float32, device)
    expected = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE)
    loss = sk.linear_cross_entropy(hidden, weight, labels, backend=any_backend)
    torch.testing.assert_close(loss, expected)
    # Only the weight needs a gradient (a frozen trunk): hidden gets none.
    w = weight.clone().requires_grad_()
    sk.linear_cross_entropy(hidden, w, labels, backend=any_backend).backward()
    expected_w = weight.clone().requires_grad_()
    torch.nn.functional.cross_entropy(hidden @ expected_w.t(), labels, ignore_index=IGNORE).backward()
    torch.testing.assert_close(w.grad, expected_w.grad)


def _ce_options(name, vocab, device):
    weight = torch.rand(vocab, device=device) + 0.25
    return {
        "smooth": dict(label_smoothing=0.2),
        "weight": dict(ce_weight=weight),
        "weight_smooth": dict(ce_weight=weight, label_smoothing=0.3),
        "zloss": dict(lse_square_scale=1e-2, return_z_loss=True),
        "softcap": dict(softcap=3.0),
        "accuracy": dict(return_token_accuracy=True),
        "all": dict(
            ce_weight=weight,
            label_smoothing=0.1,
            lse_square_scale=1e-2,
            softcap=4.0,
            return_z_loss=True,
            return_token_accuracy=True,
        ),
    }[name]


def _exact_ce(reduction, options):
    """float64 loss of the full logits: PyTorch's cross-entropy of the soft-capped logits + z-loss."""
    options = {("weight" if k == "ce_weight" else k): v for k, v in options.items()}

    def fn(h, w, y, b):
        logits = h @ w.t() + (b if b is not None else 0)
        return exact_cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction, **options).reshape(
            y.shape if reduction == "none" else ()
        )

    return fn


def _loss(out):
    return out if isinstance(out, torch.Tensor) else out.loss


def check_cross_entropy_options(hidden, weight, bias, labels, reduction, options, backend, **kwargs):
    upstream = torch.randn(labels.shape if reduction == "none" else (), device=hidden.device)
    check(
        lambda h, w, y, b: _loss(
            sk.linear_cross_entropy(
                h, w, y, bias=b, reduction=reduction, backend=options_backend(backend), **options, **kwargs
            )
        ),
        lambda h, w, y, b: _loss(linear_cross_entropy_ref(h, w, y, b, reduction=reduction, **options)),
        _exact_ce(reduction, options),
        hidden,
        weight,
        bias,
        labels,
        upstream,
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", ["smooth", "weight", "weight_smooth", "zloss", "softcap", "accuracy"])
def test_cross_entropy_each_option(option, reduction, device, any_backend):
    """Liger's options one at a time: loss and every gradient against float64 (fp32)."""
    hidden, weight, bias, labels = make((29,), 24, 131, torch.float32, device, bias=True)
    check_cross_entropy_options(
        hidden, weight, bias, labels, reduction, _ce_options(option, 131, device), any_backend, chunk_size=8
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_all_options(reduction, dtype, device, any_backend):
    """Every option at once, [B, T, d] hidden, odd sizes, each dtype: within 2x eager's error."""
    hidden, weight, bias, labels = make((3, 7), 33, 257, dtype, device, bias=True)
    check_cross_entropy_options(
        hidden, weight, bias, labels, reduction, _ce_options("all", 257, device), any_backend, chunk_size=5
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_options_non_contiguous(reduction, dtype, device, any_backend):
    hidden = torch.randn(2, 40, 9, dtype=dtype, device=device).transpose(1, 2)  # [B, T, d] view
    weight = (torch.randn(40, 150, dtype=dtype, device=device) / 3).t()  # [V, d], column-major
    bias = torch.randn(300, dtype=dtype, device=device)[::2]
    labels = torch.randint(0, 150, (9, 2), device=device).t()
    labels[0, :3] = IGNORE
    options = _ce_options("all", 150, device)
    options["ce_weight"] = torch.rand(300, device=device)[::2]
    check_cross_entropy_options(hidden, weight, bias, labels, reduction, options, any_backend)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_options_partial_grads(reduction, device, any_backend):
    """Only the weight (a frozen trunk), or only the hidden states, need a gradient."""
    hidden, weight, _, labels = make((17,), 16, 99, torch.float32, device)
    options = _ce_options("all", 99, device)
    upstream = torch.randn(labels.shape if reduction == "none" else (), device=device)
    for wants in ("weight", "hidden"):
        h = hidden.clone().requires_grad_(wants == "hidden")
        w = weight.clone().requires_grad_(wants == "weight")
        out = sk.linear_cross_entropy(
            h, w, labels, reduction=reduction, backend=options_backend(any_backend), **options
        )
        (grad,) = torch.autograd.grad(out.loss, [w if wants == "weight" else h], upstream)
        h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        ref = linear_cross_entropy_ref(h2, w2, labels, reduction=reduction, **options)
        (expected,) = torch.autograd.grad(ref.loss, [w2 if wants == "weight" else h2], upstream)
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_cross_entropy_output_type(device, any_backend):
    """The default call returns the loss tensor (as before); the flags return Liger's fields."""
    hidden, weight, _, labels = make((3, 5), 8, 30, torch.float32, device)
    plain = sk.linear_cross_entropy(hidden, weight, labels, backend=any_backend)
    assert isinstance(plain, torch.Tensor) and plain.shape == ()
    out = sk.linear_cross_entropy(
        hidden,
        weight,
        labels,
        reduction="none",
        lse_square_scale=0.1,
        return_z_loss=True,
        return_token_accuracy=True,
        backend=options_backend(any_backend),
    )
    assert isinstance(out, sk.CrossEntropyOutput)
    assert out.loss.shape == out.z_loss.shape == out.token_accuracy.shape == (3, 5)
    only_z = sk.linear_cross_entropy(
        hidden, weight, labels, lse_square_scale=0.1, return_z_loss=True, backend=options_backend(any_backend)
    )
    assert only_z.token_accuracy is None and only_z.z_loss.shape == ()
    torch.testing.assert_close(only_z.loss - only_z.z_loss, plain)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs(average, dtype, device, any_backend):
    hidden, weight, _, labels = make((4, 10), 32, 150, dtype, device)
    labels[:, :4] = IGNORE  # prompt tokens
    labels[2] = IGNORE  # a row with no completion token

    def exact(h, w, y, b):
        logp = exact_logprobs(h, w, y, b).sum(-1)
        return logp / (y != IGNORE).sum(-1).clamp_min(1) if average else logp

    check(
        lambda h, w, y, b: sk.sequence_logprobs(h, w, y, average=average, backend=any_backend),
        lambda h, w, y, b: sequence_logprobs_ref(h, w, y, b, average=average),
        exact,
        hidden,
        weight,
        None,
        labels,
        torch.randn(4, device=device),
    )


def _storage(tensor):
    return tensor.untyped_storage().data_ptr()


class _LargestAllocation(TorchDispatchMode):
    """Records the element count of every new tensor an op produces (views and in-place results,
    which share an input's storage, are not new), inside solar_kernels' custom ops too: a dispatch
    mode sees a custom op as one op and is off while its body runs, so the recorder runs the body
    itself with the mode back on."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.sizes = []
        self.outputs = []  # (shape, dtype) of each
        self.custom_ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        definition = _maybe_get_opdef(func) if func.namespace == "solar_kernels" else None
        if definition is not None:
            self.custom_ops.add(func.name())
            with self:  # its body's tensors are recorded as they are made
                return definition._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        flat_inputs = [*args, *kwargs.values()]
        inputs = {_storage(t) for t in flat_inputs if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            # Triton's interpreter copies each kernel argument as raw bytes (uint8): not the op's.
            if isinstance(t, torch.Tensor) and t.dtype != torch.uint8 and _storage(t) not in inputs:
                self.sizes.append(t.numel())
                self.outputs.append((tuple(t.shape), t.dtype))
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "which", ["logprobs", "cross_entropy", "sequence", "cross_entropy_options", "cross_entropy_options_none"]
)
def test_full_logits_never_exist(which, dtype, device, any_backend):
    n_tokens, d, vocab = 48, 8, 1000  # N * V dwarfs every legitimate tensor (weight is V * d)
    hidden, weight, bias, labels = make((n_tokens,), d, vocab, dtype, device, bias=True)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    recorder = _LargestAllocation()
    with recorder:
        if which == "logprobs":
            out = sk.linear_logprobs(h, w, labels, bias=b, backend=any_backend).sum()
        elif which == "cross_entropy":
            out = sk.linear_cross_entropy(h, w, labels, bias=b, backend=any_backend)
        elif which.startswith("cross_entropy_options"):
            reduction = "none" if which.endswith("none") else "mean"
            out = sk.linear_cross_entropy(
                h,
                w,
                labels,
                bias=b,
                reduction=reduction,
                backend=options_backend(any_backend),
                **_ce_options("all", vocab, device),
            ).loss.sum()
        else:
            out = sk.sequence_logprobs(h.view(6, 8, d), w, labels.view(6, 8), bias=b, backend=any_backend).sum()
        out.backward()
    chunk = default_chunk_rows(n_tokens, vocab, torch.device(device).type)
    assert chunk * vocab in recorder.sizes, "the recorder must see the chunk's logits (else it sees nothing)"
    assert any(name.startswith("solar_kernels::") for name in recorder.custom_ops)
    assert recorder.largest < n_tokens * vocab // 2, f"a tensor of {recorder.largest} elements exists"
    assert h.grad is not None and w.grad is not None and b.grad is not None


def test_eager_reference_does_materialize_logits(device):
    """The recorder is able to fail: the plain reference holds all N x V logits."""
    hidden, weight, _, labels = make((48,), 8, 1000, torch.float32, device)
    recorder = _LargestAllocation()
    with recorder:
        linear_logprobs_ref(hidden, weight, labels)
    assert recorder.largest >= 48 * 1000


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("which", ["logprobs", "cross_entropy"])
def test_dweight_accumulates_in_fp32_without_16bit_partials(which, dtype, device, any_backend):
    """Every chunk adds into one fp32 accumulator inside its matmul; the only 16-bit [V, d] tensor is
    the final cast (a per-chunk bf16 partial would be rounded before it is added)."""
    hidden, weight, _, labels = make((40,), 24, 70, dtype, device)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    recorder = _LargestAllocation()
    with recorder:
        if which == "logprobs":
            sk.linear_logprobs(h, w, labels, chunk_size=7, backend=any_backend).sum().backward()
        else:
            sk.linear_cross_entropy(h, w, labels, chunk_size=7, backend=any_backend).backward()
    weight_shaped = [dt for shape, dt in recorder.outputs if shape == (70, 24)]
    assert weight_shaped.count(torch.float32) >= 1  # the accumulator
    assert weight_shaped.count(dtype) == 1, weight_shaped
    assert w.grad.dtype == dtype


def test_fp32_accumulating_matmul(device):
    """acc += a @ b for 16-bit a, b accumulates in fp32 (out_dtype on CUDA, widened operands on the CPU)."""
    module = importlib.import_module("solar_kernels.ops.linear_logprobs")
    a, b = torch.randn(70, 300, device=device).bfloat16(), torch.randn(300, 24, device=device).bfloat16()
    start = torch.randn(70, 24, device=device)
    acc = start.clone()
    module._add_matmul_fp32(acc, a, b)
    exact = start.double() + a.double() @ b.double()
    assert acc.dtype == torch.float32
    torch.testing.assert_close(acc.double(), exact, rtol=1e-5, atol=1e-4)
    assert module._addmm_out_dtype_runs(device, torch.bfloat16) == (device.type == "cuda")


def test_cross_entropy_scales_and_casts_dweight_once(device, any_backend):
    """The forward keeps dweight as its fp32 accumulator; backward applies the upstream grad and
    rounds to the weight's dtype in one step."""
    module = importlib.import_module("solar_kernels.ops.linear_logprobs")
    hidden, weight, bias, labels = make((30,), 16, 90, torch.bfloat16, device, bias=True)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    (sk.linear_cross_entropy(h, w, labels, bias=b, chunk_size=8, backend=any_backend) * 0.37).backward()
    *_, dweight, dbias = module._cross_entropy_fwd_op(
        hidden, weight, bias, labels, IGNORE, "mean", 8, True, True, True, any_backend
    )
    assert dweight.dtype == torch.float32 and dbias.dtype == torch.float32
    assert torch.equal(w.grad, (dweight * 0.37).to(torch.bfloat16))
    assert torch.equal(b.grad, (dbias * 0.37).to(torch.bfloat16))


def test_cross_entropy_backward_makes_one_weight_sized_buffer(device, any_backend):
    """fp32 weights: backward makes one [V, d] buffer, the scaled dweight (no zero-filled gradient for
    the forward's non-differentiable outputs), and a second backward through the same forward
    (retain_graph=True, as the benchmarks time it) adds the same gradient again."""
    hidden, weight, _, labels = make((30,), 16, 90, torch.float32, device)
    w, w_ref = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = sk.linear_cross_entropy(hidden, w, labels, chunk_size=8, backend=any_backend) * 0.37
    recorder = _LargestAllocation()
    with recorder:
        loss.backward(retain_graph=True)
    assert recorder.outputs.count((tuple(weight.shape), torch.float32)) == 1, recorder.outputs
    (sk.linear_cross_entropy_ref(hidden, w_ref, labels) * 0.37).backward()
    torch.testing.assert_close(w.grad, w_ref.grad)
    loss.backward()
    torch.testing.assert_close(w.grad, 2 * w_ref.grad)


def test_cross_entropy_differentiable_backward(device, any_backend):
    """create_graph=True: the scale-and-cast stays differentiable in the upstream grad."""
    hidden, weight, _, labels = make((10,), 8, 30, torch.float32, device)
    w = weight.clone().requires_grad_()
    v = torch.tensor(0.5, device=device, requires_grad=True)
    loss = sk.linear_cross_entropy(hidden, w, labels, backend=any_backend)
    (dw,) = torch.autograd.grad(loss, w, grad_outputs=v, create_graph=True)
    (dv,) = torch.autograd.grad(dw.pow(2).sum(), v)
    per_unit = dw.detach() / 0.5  # d loss / d w
    torch.testing.assert_close(dv, 2 * 0.5 * per_unit.pow(2).sum())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_torch_rows_follow_the_triton_kernel(dtype, device):
    """The torch backend's per-row step gives the kernel's results: log-probs, log-sum-exp, the
    in-place gradient, NaN for out-of-range labels, exact zeros for ignored rows."""
    module = importlib.import_module("solar_kernels.ops.linear_logprobs")
    logits = (torch.randn(9, 300, device=device) * 3).to(dtype)
    labels = torch.tensor([0, -100, 299, 300, 5, -3, -100, 17, 150], device=device)
    grad = torch.randn(9, device=device)
    results = {}
    for name, rows in (("torch", module._logprobs_rows_torch), ("triton", module._logprobs_rows)):
        args = ("triton",) if name == "triton" else ()
        z, logp, lse = logits.clone(), torch.full((9,), 7.0, device=device), torch.full((9,), 7.0, device=device)
        rows(*args, z, labels, logp, lse, grad, IGNORE, True, True)  # forward and gradient in one pass
        z_again = logits.clone()
        rows(*args, z_again, labels, lse, lse.clone(), grad, IGNORE, False, True)  # gradient from the saved lse
        results[name] = (logp, lse, z, z_again)
    for ours, kernel in zip(results["torch"], results["triton"]):
        torch.testing.assert_close(
            ours, kernel, equal_nan=True, **({} if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3))
        )
    logp, lse, z, z_again = results["torch"]
    assert torch.isnan(logp[[3, 5]]).all() and torch.isfinite(logp[[0, 1, 2, 4, 6, 7, 8]]).all()
    assert (logp[[1, 6]] == 0).all() and (lse[[1, 6]] == 0).all()
    assert (z[[1, 6]] == 0).all() and (z_again[[1, 6]] == 0).all()
    assert torch.isnan(z[[3, 5]]).all() and torch.isfinite(z[[0, 2, 4, 7, 8]]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "class_weights"])
def test_torch_rows_follow_the_triton_kernel_with_options(weighted, dtype, device):
    """With every cross-entropy option on (soft-capping, smoothing sums, accuracy, smoothing and
    z-loss gradient terms) the two row steps agree, over two vocabulary tiles (V = 4100), with
    the same rules for ignored and out-of-range rows."""
    module = importlib.import_module("solar_kernels.ops.linear_logprobs")
    rows, vocab = 7, 4100
    logits = (torch.randn(rows, vocab, device=device) * 4).to(dtype)
    labels = torch.tensor([0, -100, 4099, 4100, 4097, 17, -100], device=device)
    logits[4, 4097] = 40.0  # row 4's argmax is its label, in the second tile
    class_weight = torch.rand(vocab, device=device) + 0.5 if weighted else None
    grad, grad_smooth, grad_z = (torch.randn(rows, device=device) for _ in range(3))
    results = {}
    for name in ("torch", "triton"):
        forward = module.RowOptions(
            softcap=5.0,
            class_weight=class_weight,
            smooth_sum=torch.full((rows,), 7.0, device=device),
            correct=torch.full((rows,), 7.0, device=device),
        )
        backward = module.RowOptions(
            softcap=5.0,
            class_weight=class_weight,
            grad_smooth=grad_smooth,
            grad_z=grad_z,
            class_weight_sum=class_weight.sum() if weighted else None,
        )
        z, logp, lse = logits.clone(), torch.zeros(rows, device=device), torch.zeros(rows, device=device)
        module._logprobs_rows(name, z, labels, logp, lse, grad, IGNORE, True, False, forward)
        dz = logits.clone()
        module._logprobs_rows(name, dz, labels, lse, lse.clone(), grad, IGNORE, False, True, backward)
        results[name] = (logp, lse, forward.smooth_sum, forward.correct, dz)
    tolerance = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    for index, (ours, kernel) in enumerate(zip(results["torch"], results["triton"])):
        # the smoothing sum adds 4100 terms of either sign: its summation order shows at ~1e-7 of sum |z|
        close = dict(rtol=1e-5, atol=2e-3) if index == 2 else tolerance
        torch.testing.assert_close(ours, kernel, equal_nan=True, **close)
    logp, lse, smooth_sum, correct, dz = results["triton"]
    capped = 5.0 * torch.tanh(logits.float() / 5.0)
    expected_sum = (capped * (class_weight if weighted else 1.0)).sum(1)
    torch.testing.assert_close(smooth_sum[[0, 2, 4, 5]], expected_sum[[0, 2, 4, 5]], rtol=1e-5, atol=1e-2)
    assert correct.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert (smooth_sum[[1, 6]] == 0).all() and (dz[[1, 6]] == 0).all()
    assert torch.isnan(logp[3]) and torch.isnan(dz[3]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_custom_op_fakes_match_the_real_outputs(dtype):
    """torch.library.opcheck on every LM-head custom op: schema, autograd registration and the fakes
    (built by one helper) against the real outputs, with each gradient asked for or not."""
    ops = torch.ops.solar_kernels
    hidden, weight, bias, labels = make((9,), 16, 40, dtype, "cpu", bias=True)
    labels[2] = IGNORE
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    class_weight = torch.rand(40) + 0.5
    torch.library.opcheck(ops.linear_logprobs_fwd, (*leaves, labels, IGNORE, 4, "torch"))
    logp, lse = ops.linear_logprobs_fwd(hidden, weight, bias, labels, IGNORE, 4, "torch")
    torch.library.opcheck(
        ops.linear_cross_entropy_tokens_fwd, (*leaves, labels, IGNORE, 4, "torch", class_weight, 0.1, 1e-3, 3.0, True)
    )
    for need in ((True, True, True), (False, True, False), (True, False, True)):
        torch.library.opcheck(
            ops.linear_logprobs_bwd, (torch.randn(9), hidden, weight, bias, labels, lse, IGNORE, 4, *need, "torch")
        )
        torch.library.opcheck(
            ops.linear_cross_entropy_fwd,
            (hidden, weight, bias, labels, IGNORE, "mean", 4, *need, "torch", class_weight, 0.1, 1e-3, 3.0, True),
        )
    logits = torch.randn(9, 40, dtype=dtype, requires_grad=True)
    torch.library.opcheck(ops.cross_entropy_fwd, (logits, labels, IGNORE, "torch", class_weight, 0.1, 1e-3, 3.0, True))
    torch.library.opcheck(
        ops.cross_entropy_bwd,
        (
            logits.detach(),
            labels,
            lse,
            torch.randn(9),
            IGNORE,
            "torch",
            3.0,
            class_weight,
            torch.rand(9),
            torch.rand(9),
        ),
    )


def test_default_chunk_rows_rule():
    assert default_chunk_rows(16384, 32000) == 4096  # 4096 rows where they fit
    assert default_chunk_rows(16384, 49152) == 4096
    assert default_chunk_rows(16384, 128256) == 2048  # logits capped at 2**28 elements
    assert default_chunk_rows(16384, 152064) == 1728  # ... in whole 64-row tiles
    assert default_chunk_rows(2048, 49152) == 960  # fewer than half of the tokens
    assert default_chunk_rows(1022, 49152, "cpu") == 85  # the CPU's cap: 2**22 logits
    assert default_chunk_rows(16384, 32000, "cpu") == 128
    assert default_chunk_rows(16384, 32000, "cuda") == 4096
    for rows in (1, 2, 3, 10, 1000):
        chunk = default_chunk_rows(rows, 10)
        assert chunk >= 1 and (rows < 3 or chunk * 2 < rows)


@pytest.mark.parametrize("which", ["logprobs", "cross_entropy", "sequence", "options_mean", "options_none"])
def test_torch_compile_fullgraph(which, device, any_backend):
    torch._dynamo.reset()  # each case compiles the same function: no recompile limit across cases
    hidden, weight, bias, labels = make((3, 7), 16, 90, torch.float32, device, bias=True)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))

    def f(h, w, b):
        if which == "logprobs":
            return (sk.linear_logprobs(h, w, labels, bias=b, backend=any_backend) * 1.5).sum()
        if which == "sequence":
            return sk.sequence_logprobs(h, w, labels, bias=b, average=True, backend=any_backend).pow(2).sum()
        if which.startswith("options"):
            out = sk.linear_cross_entropy(
                h, w, labels, bias=b, reduction=which[8:], backend=options_backend(any_backend), **options
            )
            return (out.loss * 1.5).sum() + out.z_loss.sum()
        return sk.linear_cross_entropy(h, w, labels, bias=b, backend=any_backend) * 1.5

    options = _ce_options("all", 90, device)
    assert_compiles_like_eager(f, h, w, b)


def _args(**overrides):
    args = dict(hidden=torch.randn(6, 8), weight=torch.randn(20, 8), labels=torch.randint(0, 20, (6,)))
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(hidden=torch.randn(6)), ValueError, "hidden must have 2 or 3 dimensions, got 1"),
        (dict(weight=torch.randn(20, 9)), ValueError, r"weight must be \[V, d\] with d = 8 .* got \(20, 9\)"),
        (
            dict(weight=torch.randn(20, 8, dtype=torch.bfloat16)),
            TypeError,
            "weight has dtype torch.bfloat16, expected torch.float32",
        ),
        (dict(labels=torch.randint(0, 20, (5,))), ValueError, r"labels has shape \(5,\), expected \(6,\)"),
        (dict(labels=torch.rand(6)), TypeError, "labels must be int64 or int32, got torch.float32"),
        (dict(labels=torch.tensor([0, 1, 2, 20, 4, 5])), ValueError, r"labels\[3\] = 20 is outside \[0, 20\)"),
        (dict(labels=torch.tensor([0, 1, -1, 2, 4, 5])), ValueError, r"labels\[2\] = -1 is outside"),
        (
            dict(hidden=torch.randn(0, 8), labels=torch.zeros(0, dtype=torch.long)),
            ValueError,
            "hidden must not be empty",
        ),
        (dict(labels=torch.randint(0, 20, (6,), device="meta")), ValueError, "labels is on meta"),
        (dict(bias=torch.randn(19)), ValueError, r"bias has shape \(19,\), expected \(20,\)"),
        (dict(ignore_index=None), TypeError, "ignore_index must be an int"),
        (dict(chunk_size=0), ValueError, "chunk_size must be a positive int or None, got 0"),
        (dict(backend="cuda"), RuntimeError, "backend 'cuda' is not available"),
        (dict(backend="jax"), ValueError, "backend must be one of None, 'torch', 'triton', 'cuda', 'auto'; got 'jax'"),
    ],
)
@pytest.mark.parametrize("op", ["linear_logprobs", "linear_cross_entropy"])
def test_bad_input(op, overrides, error, message):
    with pytest.raises(error, match=message):
        getattr(sk, op)(**_args(**overrides))


def test_bad_reduction_and_sequence_rank():
    with pytest.raises(ValueError, match="reduction must be one of"):
        sk.linear_cross_entropy(**_args(reduction="avg"))
    with pytest.raises(ValueError, match="hidden must have 3 dimensions, got 2"):
        sk.sequence_logprobs(**_args())


def test_out_of_range_label_checked_before_any_work(device, monkeypatch, any_backend):
    """The check runs before any kernel (on a GPU only with SOLAR_KERNELS_CHECK_LABELS=1)."""
    monkeypatch.setenv("SOLAR_KERNELS_CHECK_LABELS", "1")
    module = importlib.import_module("solar_kernels.ops.linear_logprobs")
    calls = []
    monkeypatch.setattr(module, "_chunked_pass", lambda *a, **k: calls.append(1))
    labels = torch.tensor([3, IGNORE, 99])
    with pytest.raises(ValueError, match=r"labels\[2\] = 99"):
        sk.linear_logprobs(
            torch.randn(3, 4, device=device), torch.randn(10, 4, device=device), labels.to(device), backend=any_backend
        )
    assert not calls


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_solar_vocab_on_gpu(dtype, any_backend):
    hidden, weight, bias, labels = make((1024,), 4096, 32000, dtype, "cuda")
    check_logprobs(hidden, weight, None, labels, backend=any_backend)


@pytest.mark.gpu
def test_out_of_range_label_gives_nan_on_gpu_without_flag(monkeypatch, any_backend):
    monkeypatch.delenv("SOLAR_KERNELS_CHECK_LABELS", raising=False)
    hidden, weight, _, labels = make((8,), 16, 50, torch.float32, "cuda", ignore_share=0)
    labels[3] = 50
    logp = sk.linear_logprobs(hidden, weight, labels, backend=any_backend)
    assert torch.isnan(logp[3]) and torch.isfinite(logp[[0, 1, 2, 4, 5, 6, 7]]).all()
    monkeypatch.setenv("SOLAR_KERNELS_CHECK_LABELS", "1")
    with pytest.raises(ValueError, match=r"labels\[3\] = 50"):
        sk.linear_logprobs(hidden, weight, labels, backend=any_backend)
