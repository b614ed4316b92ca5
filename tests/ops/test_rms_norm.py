import pytest
import torch

import solar_kernels as sk
from solar_kernels.ops.rms_norm import rms_norm_ref
from tests.tolerances import DTYPE_IDS, DTYPES, assert_close

EPS = 1e-5


def exact_rms_norm(x, weight, dy, residual=None, dh=None):
    """SPEC §4 in float64, written out: forward, and the closed-form backward."""
    h = x.double() + (residual.double() if residual is not None else 0)
    w, dy = weight.double(), dy.double()
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    n = h * rstd
    y = w * n
    g = dy * w
    dx = rstd * (g - n * (g * n).mean(-1, keepdim=True))
    if dh is not None:
        dx = dx + dh.double()
    dw = (dy * n).reshape(-1, n.shape[-1]).sum(0)
    return y, h, dx, dw


def run(fn, x, weight, dy, residual=None, dh=None):
    """Forward and gradients of x, weight (and residual) for upstream grads dy (and dh)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight)]
    if residual is not None:
        leaves.append(residual.detach().clone().requires_grad_())
        y, h = fn(leaves[0], leaves[1], residual=leaves[2])
        torch.autograd.backward([y, h], [dy, dh])
        return y, h, [leaf.grad for leaf in leaves]
    y = fn(leaves[0], leaves[1])
    y.backward(dy)
    return y, None, [leaf.grad for leaf in leaves]


def check(x, weight, residual=None, backend="triton"):
    dtype = x.dtype
    dy = torch.randn(x.shape, dtype=dtype, device=x.device)
    dh = torch.randn(x.shape, dtype=dtype, device=x.device) if residual is not None else None
    ours_fn = lambda *a, **k: sk.rms_norm(*a, eps=EPS, backend=backend, **k)  # noqa: E731
    torch_fn = lambda *a, **k: rms_norm_ref(*a, eps=EPS, **k)  # noqa: E731
    y, h, grads = run(ours_fn, x, weight, dy, residual, dh)
    y_ref, h_ref, grads_ref = run(torch_fn, x, weight, dy, residual, dh)
    y64, h64, dx64, dw64 = exact_rms_norm(x, weight, dy, residual, dh)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close("y", y, y_ref, y64, dtype)
    assert_close("dx", grads[0], grads_ref[0], dx64, dtype)
    assert_close("dweight", grads[1], grads_ref[1], dw64, dtype)
    assert grads[1].dtype == weight.dtype
    if residual is not None:
        assert torch.equal(h, h_ref), "h = x + residual must round exactly like eager torch"
        assert_close("h", h, h_ref, h64, dtype)
        assert_close("dresidual", grads[2], grads_ref[2], dx64, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(5, 1), (3, 7, 123), (6, 4096), (3, 4097), (2, 14336), (2, 65536)])
def test_matches_reference(shape, dtype, device, kernel_backend):
    x = torch.randn(shape, dtype=dtype, device=device)
    weight = torch.randn(shape[-1], dtype=dtype, device=device)
    check(x, weight, backend=kernel_backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(9, 123), (2, 3, 4096), (3, 14336)])
def test_fused_residual(shape, dtype, device, kernel_backend):
    x = torch.randn(shape, dtype=dtype, device=device)
    residual = torch.randn(shape, dtype=dtype, device=device) * 4
    weight = torch.randn(shape[-1], dtype=dtype, device=device)
    check(x, weight, residual, backend=kernel_backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["row_slice", "transposed"])
def test_non_contiguous(layout, dtype, device, kernel_backend):
    d = 123
    if layout == "row_slice":  # rows of a wider buffer: read in place through the row stride
        x = torch.randn(17, 2 * d + 5, dtype=dtype, device=device)[:, 3 : 3 + d]
        residual = torch.randn(17, 3 * d, dtype=dtype, device=device)[:, ::3]
    else:  # column-major: copied to rows first
        x = torch.randn(d, 17, dtype=dtype, device=device).t()
        residual = torch.randn(d, 17, dtype=dtype, device=device).t()
    weight = torch.randn(2 * d, dtype=dtype, device=device)[::2]
    check(x, weight, backend=kernel_backend)
    check(x, weight, residual, backend=kernel_backend)


def test_mixed_weight_dtype_keeps_x_dtype(device, kernel_backend):
    x = torch.randn(4, 64, dtype=torch.bfloat16, device=device)
    weight = torch.randn(64, dtype=torch.float32, device=device)
    check(x, weight, backend=kernel_backend)
    assert sk.rms_norm(x, weight, backend=kernel_backend).dtype == torch.bfloat16


def test_does_not_write_inputs(device, kernel_backend):
    x = torch.randn(8, 96, device=device)
    residual = torch.randn(8, 96, device=device)
    weight = torch.randn(96, device=device)
    saved = [t.clone() for t in (x, residual, weight)]
    y, h = sk.rms_norm(x, weight, residual=residual, backend=kernel_backend)
    for before, after in zip(saved, (x, residual, weight)):
        assert torch.equal(before, after)
    assert h.data_ptr() not in (x.data_ptr(), residual.data_ptr())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_transformers_llama_rms_norm(dtype, device, kernel_backend):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    d = 4096
    hf = LlamaRMSNorm(d, eps=EPS).to(device=device, dtype=dtype)
    ours = sk.RMSNorm(d, eps=EPS, backend=kernel_backend, device=device, dtype=dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(d, dtype=dtype, device=device))
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(3, 5, d, dtype=dtype, device=device)
    # Same fp32 reduction and the same two roundings as HF: at most an ulp apart (fp32 sum order).
    torch.testing.assert_close(ours(x), hf(x))


def test_module_residual_form(device, kernel_backend):
    norm = sk.RMSNorm(32, eps=EPS, backend=kernel_backend, device=device)
    x, r = torch.randn(2, 32, device=device), torch.randn(2, 32, device=device)
    y, h = norm(x, r)
    y_ref, h_ref = rms_norm_ref(x, norm.weight, EPS, r)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)
    assert "eps=1e-05" in repr(norm)


def test_torch_compile_fullgraph(device, kernel_backend):
    x = torch.randn(4, 3, 48, device=device, requires_grad=True)
    r = torch.randn(4, 3, 48, device=device, requires_grad=True)
    w = torch.randn(48, device=device, requires_grad=True)

    def f(x, r, w):
        y, h = sk.rms_norm(x, w, eps=EPS, residual=r, backend=kernel_backend)
        return (y * h).sum()

    eager = f(x, r, w)
    eager_grads = torch.autograd.grad(eager, (x, r, w))
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(x, r, w)
    grads = torch.autograd.grad(out, (x, r, w))
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: (torch.ones(4, 8, dtype=torch.int64), torch.randn(8)), TypeError, "x must be float32, float16 or bfloat16, got torch.int64"),
        (lambda: (torch.randn(4, 8), torch.randn(7)), ValueError, "weight has 7 elements, expected 8"),
        (lambda: (torch.randn(4, 8), torch.randn(2, 8)), ValueError, "weight must have 1 dimensions, got 2"),
        (lambda: (torch.randn(0, 8), torch.randn(8)), ValueError, "x must not be empty"),
        (lambda: (torch.randn(4, 8), torch.randn(8, device="meta")), ValueError, "weight is on meta"),
        (lambda: ([1.0, 2.0], torch.randn(2)), TypeError, "x must be a torch.Tensor, got list"),
        (lambda: (torch.tensor(1.0), torch.randn(1)), ValueError, "x must have at least 1 dimension"),
    ],
)
def test_bad_input(make, error, message):
    x, weight = make()
    with pytest.raises(error, match=message):
        sk.rms_norm(x, weight, backend="torch")


def test_bad_residual_and_eps():
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(ValueError, match=r"residual has shape \(4, 9\), expected \(4, 8\)"):
        sk.rms_norm(x, w, residual=torch.randn(4, 9))
    with pytest.raises(TypeError, match="residual has dtype torch.float16, expected torch.float32"):
        sk.rms_norm(x, w, residual=torch.randn(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="eps must be a non-negative float, got -1"):
        sk.rms_norm(x, w, eps=-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 7), (5, 123), (264, 4096), (3, 4097)])
def test_dweight_column_sum_is_one_kernel_in_weight_dtype(shape, dtype, device):
    """The backward's dweight: one kernel sums the fp32 per-program partials and rounds once to
    weight's dtype. The partials are multiples of 1/8, so their fp32 sum is exact in any order and
    the result must equal the exact column sum rounded once."""
    from solar_kernels.ops.rms_norm import _column_sum

    partial = torch.randint(-64, 64, shape, device=device).float() / 8
    out = _column_sum(partial, dtype)
    assert out.dtype == dtype and out.shape == (shape[1],)
    assert torch.equal(out, partial.double().sum(0).to(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_solar_shapes_on_gpu(dtype, kernel_backend):
    x = torch.randn(4096, 4096, dtype=dtype, device="cuda")
    r = torch.randn_like(x)
    w = torch.randn(4096, dtype=dtype, device="cuda")
    check(x, w, backend=kernel_backend)
    check(x, w, r, backend=kernel_backend)
    for d in (1024, 16384, 65536):
        check(torch.randn(64, d, dtype=dtype, device="cuda"), torch.randn(d, dtype=dtype, device="cuda"), backend=kernel_backend)
