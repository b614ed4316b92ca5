"""The CUDA C++ backend on a GPU, beyond the op tests (which run every correctness case on both
backends through the ``kernel_backend`` fixture): ``torch.library.opcheck`` on every op, CUDA
against Triton on the same inputs, misaligned inputs (the scalar fallback), bad input raising a
RuntimeError that names the op (and no illegal access after it), and the auto backend measuring,
storing and reusing its choices."""

from __future__ import annotations

import functools
import importlib
import json
import math

import pytest
import torch

import solar_kernels as sk
from solar_kernels import _autotune
from solar_kernels.ops import _registry
from tests import helpers
from tests.helpers import check_logprobs, check_rms_norm, check_rotary, check_swiglu, rope_tables
from tests.helpers import make_lm_head as make
from tests.tolerances import DTYPE_IDS, DTYPES, assert_close

pytestmark = pytest.mark.gpu

logprobs_module = importlib.import_module("solar_kernels.ops.linear_logprobs")
RMS_NORM_FWD, RMS_NORM_BWD = _registry.KERNELS["rms_norm_fwd"], _registry.KERNELS["rms_norm_bwd"]


@pytest.fixture
def ops(cuda_ops):
    return cuda_ops


def rand(*shape, dtype=torch.bfloat16, scale=1.0):
    return torch.randn(*shape, device="cuda").mul_(scale).to(dtype)


# A tensor starting one element into its buffer: not 16-byte aligned, so the kernels take their scalar path.
misaligned = functools.partial(helpers.misaligned, device="cuda")


def rms_fwd_args(x, weight, residual=None):
    """rms_norm_fwd's arguments, the outputs allocated by its record."""
    return x, weight, residual, *RMS_NORM_FWD.allocate(x, weight, residual), 1e-5


def rms_bwd_args(dy, h, weight, rstd, dh=None):
    return dy, h, weight, rstd, dh, *RMS_NORM_BWD.allocate(dy, h, weight, rstd, dh)


# ---- opcheck (bf16: each opcheck traces and compiles; the other dtypes run in the op tests) -------


def test_opcheck_cuda_ops(ops, dtype=torch.bfloat16):
    x, r = rand(37, 4096, dtype=dtype), rand(37, 4096, dtype=dtype)
    for weight in (rand(4096, dtype=dtype), rand(4096, dtype=torch.float32)):
        torch.library.opcheck(ops.rms_norm_fwd, rms_fwd_args(x, weight))
        torch.library.opcheck(ops.rms_norm_fwd, rms_fwd_args(x, weight, r))
        rstd = torch.rand(37, device="cuda") + 0.5
        torch.library.opcheck(ops.rms_norm_bwd, rms_bwd_args(r, x, weight, rstd))
        torch.library.opcheck(ops.rms_norm_bwd, rms_bwd_args(r, x, weight, rstd, rand(37, 4096, dtype=dtype)))
    q = rand(2, 9, 8, 128, dtype=dtype).transpose(1, 2)  # [B, H, T, D] view of [B, T, H, D]
    k = rand(2, 2, 9, 128, dtype=dtype)
    cos, sin = rope_tables(torch.arange(9, device="cuda"), 128)
    for backward in (False, True):
        torch.library.opcheck(ops.rotary, (q, k, cos, sin, torch.empty_like(q), torch.empty_like(k), backward))
    gate, up = rand(13, 2 * 1000, dtype=dtype).chunk(2, dim=-1)
    torch.library.opcheck(ops.swiglu_fwd, (gate, up, torch.empty_like(gate)))
    torch.library.opcheck(
        ops.swiglu_bwd,
        (rand(13, 1000, dtype=dtype), gate, up, rand(13, 1000, dtype=dtype), rand(13, 1000, dtype=dtype)),
    )
    labels = torch.randint(0, 3000, (11,), device="cuda")
    labels[::3] = -100
    for compute_lse, write_grad in ((True, False), (True, True), (False, True)):
        logits = rand(11, 3000, dtype=dtype)
        logp, lse = torch.empty(11, device="cuda"), torch.logsumexp(logits.float(), -1)
        torch.library.opcheck(
            ops.logprobs_, (logits, labels, logp, lse, torch.randn(11, device="cuda"), -100, compute_lse, write_grad)
        )


def test_opcheck_python_ops_on_cuda(ops, dtype=torch.bfloat16):
    """The shared custom ops (with their autograd) with backend "cuda"."""
    lib = torch.ops.solar_kernels
    x = rand(5, 7, 256, dtype=dtype).requires_grad_()
    w = rand(256, dtype=dtype).requires_grad_()
    torch.library.opcheck(lib.rms_norm_fwd, (x, w, rand(5, 7, 256, dtype=dtype).requires_grad_(), 1e-5, "cuda"))
    q, k = rand(2, 8, 6, 64, dtype=dtype).requires_grad_(), rand(2, 2, 6, 64, dtype=dtype).requires_grad_()
    cos, sin = rope_tables(torch.arange(6, device="cuda"), 64)
    torch.library.opcheck(lib.apply_rotary, (q, k, cos, sin, False, "cuda"))
    gate, up = rand(6, 300, dtype=dtype).requires_grad_(), rand(6, 300, dtype=dtype).requires_grad_()
    torch.library.opcheck(lib.swiglu_fwd, (gate, up, "cuda"))
    hidden, weight = rand(20, 64, dtype=dtype).requires_grad_(), rand(500, 64, dtype=dtype, scale=0.2).requires_grad_()
    labels = torch.randint(0, 500, (20,), device="cuda")
    torch.library.opcheck(lib.linear_logprobs_fwd, (hidden, weight, None, labels, -100, 8, "cuda"))
    torch.library.opcheck(
        lib.linear_cross_entropy_fwd, (hidden, weight, None, labels, -100, "mean", 8, True, True, False, "cuda")
    )


# ---- CUDA against Triton --------------------------------------------------------------------------


def both_backends(fn, inputs, upstream):
    """(outputs, grads) of fn(backend, *leaves) for backends "cuda" and "triton" on the same inputs."""
    results = {}
    for backend in ("cuda", "triton"):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        outs = fn(backend, *leaves)
        outs = list(outs) if isinstance(outs, tuple) else [outs]
        grads = torch.autograd.grad(outs, leaves, upstream)
        results[backend] = ([o.detach() for o in outs], list(grads))
    return results


def assert_cuda_matches_triton(fn, inputs, exact_fn, upstream):
    """Each output and gradient of CUDA within the tolerance rule, with Triton's error as the yardstick."""
    results = both_backends(fn, inputs, upstream)
    exact_inputs = [t.detach().double().requires_grad_() for t in inputs]
    exact_outs = exact_fn(*exact_inputs)
    exact_outs = list(exact_outs) if isinstance(exact_outs, tuple) else [exact_outs]
    exact_grads = torch.autograd.grad(exact_outs, exact_inputs, [u.double() for u in upstream])
    dtype = inputs[0].dtype
    (cuda_outs, cuda_grads), (triton_outs, triton_grads) = results["cuda"], results["triton"]
    for i, (c, t, e) in enumerate(
        zip(cuda_outs + cuda_grads, triton_outs + triton_grads, exact_outs + list(exact_grads))
    ):
        assert c.dtype == t.dtype and c.shape == t.shape
        assert_close(f"result {i}", c, t, e, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_matches_triton_at_solar_widths(ops, dtype):
    """SOLAR's widths (d = 4096, I = 14336, 32 + 8 heads of 128, V = 32000) on fewer tokens; the op
    tests run the full SOLAR shapes against the reference on both backends."""
    x, r, w = rand(512, 4096, dtype=dtype), rand(512, 4096, dtype=dtype), rand(4096, dtype=dtype)
    upstream = [rand(512, 4096, dtype=dtype), rand(512, 4096, dtype=dtype)]
    assert_cuda_matches_triton(
        lambda b, x, r, w: sk.rms_norm(x, w, 1e-5, residual=r, backend=b),
        [x, r, w],
        lambda x, r, w: sk.rms_norm_ref(x, w, 1e-5, r),
        upstream,
    )
    q, k = rand(2, 32, 256, 128, dtype=dtype), rand(2, 8, 256, 128, dtype=dtype)
    cos, sin = rope_tables(torch.arange(256, device="cuda"), 128)
    assert_cuda_matches_triton(
        lambda b, q, k: sk.apply_rotary(q, k, cos, sin, backend=b),
        [q, k],
        lambda q, k: sk.apply_rotary_ref(q, k, cos.double(), sin.double()),
        [torch.randn_like(q), torch.randn_like(k)],
    )
    gate, up = rand(512, 14336, dtype=dtype, scale=3), rand(512, 14336, dtype=dtype)
    assert_cuda_matches_triton(
        lambda b, g, u: sk.swiglu(g, u, backend=b), [gate, up], sk.swiglu_ref, [torch.randn_like(gate)]
    )
    hidden, weight, _, labels = make((256,), 4096, 32000, dtype, "cuda")
    assert_cuda_matches_triton(
        lambda b, h, w: sk.linear_logprobs(h, w, labels, backend=b),
        [hidden, weight],
        lambda h, w: sk.linear_logprobs_ref(h, w, labels),
        [torch.randn(256, device="cuda")],
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("vocab", [32000, 4097])
def test_logprobs_kernel_is_a_drop_in_for_the_triton_kernel(ops, dtype, vocab):
    """Same arguments, same results, NaN for out-of-range labels, zeros for ignored rows."""
    rows = 37
    logits = rand(rows, vocab, dtype=dtype, scale=3)
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    labels[::5], labels[3], labels[7] = -100, vocab, -2  # ignored rows and two out-of-range labels
    grad = torch.randn(rows, device="cuda")
    results = {}
    for backend in ("cuda", "triton"):
        z, logp, lse = logits.clone(), torch.full((rows,), 7.0, device="cuda"), torch.full((rows,), 7.0, device="cuda")
        logprobs_module._logprobs_rows(backend, z, labels, logp, lse, grad, -100, True, True)
        z2 = logits.clone()  # the backward's call: lse given, gradient only
        logprobs_module._logprobs_rows(backend, z2, labels, lse, lse, grad, -100, False, True)
        results[backend] = (logp, lse, z, z2)
    for cuda, triton in zip(results["cuda"], results["triton"]):
        assert torch.equal(torch.isnan(cuda), torch.isnan(triton))
        torch.testing.assert_close(
            cuda,
            triton,
            equal_nan=True,
            rtol=2e-2 if dtype != torch.float32 else 1e-5,
            atol=1e-2 if dtype != torch.float32 else 1e-5,
        )
    logp, lse, z, _ = results["cuda"]
    assert torch.isnan(logp[[3, 7]]).all() and (logp[::5] == 0).all() and (lse[::5] == 0).all()
    assert (z[::5] == 0).all() and torch.isnan(z[[3, 7]]).all()
    valid = (labels >= 0) & (labels < vocab)
    torch.testing.assert_close(lse[valid], torch.logsumexp(logits.float(), -1)[valid], rtol=1e-5, atol=1e-5)


# ---- the scalar fallback -----------------------------------------------------------------------------


def misaligned_leaf(shape, dtype, scale=1.0):
    """(leaf buffer, view of it): the view starts one element in, so it is not 16-byte aligned and
    the kernels take their scalar path, in forward and (through the saved inputs) in backward."""
    buffer = rand(math.prod(shape) + 1, dtype=dtype, scale=scale).requires_grad_()
    view = buffer[1:].view(shape)
    assert view.data_ptr() % 16 != 0
    return buffer, view


def check_misaligned(ours, reference, shapes, dtype, scales=None):
    """ours(*misaligned views) against reference(*aligned copies) in dtype and in float64: outputs
    and the gradients of every input."""
    scales = scales or [1.0] * len(shapes)
    leaves = [misaligned_leaf(shape, dtype, scale) for shape, scale in zip(shapes, scales)]
    outs = ours(*(view for _, view in leaves))
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    upstream = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, upstream)
    grads = [buffer.grad[1:].view(view.shape) for buffer, view in leaves]

    def run(fn, cast):
        inputs = [cast(view.detach()).requires_grad_() for _, view in leaves]
        results = fn(*inputs)
        results = list(results) if isinstance(results, tuple) else [results]
        return results, torch.autograd.grad(results, inputs, [cast(u) for u in upstream])

    eager, eager_grads = run(reference, lambda t: t.clone())
    exact, exact_grads = run(reference, lambda t: t.double())
    for i, (a, b, c) in enumerate(zip(outs + grads, eager + list(eager_grads), exact + list(exact_grads))):
        assert_close(f"result {i}", a, b, c, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_misaligned_inputs_take_the_scalar_path(ops, dtype):
    d = 4096
    check_misaligned(
        lambda x, w: sk.rms_norm(x, w, 1e-5, backend="cuda"),
        lambda x, w: sk.rms_norm_ref(x, w, 1e-5),
        [(9, d), (d,)],
        dtype,
    )
    check_misaligned(
        lambda x, r, w: sk.rms_norm(x, w, 1e-5, residual=r, backend="cuda"),
        lambda x, r, w: sk.rms_norm_ref(x, w, 1e-5, r),
        [(9, d), (9, d), (d,)],
        dtype,
    )
    cos, sin = rope_tables(torch.arange(11, device="cuda"), 128, dtype=dtype)
    cos_shifted, sin_shifted = misaligned(11, 128, dtype=dtype).copy_(cos), misaligned(11, 128, dtype=dtype).copy_(sin)
    check_misaligned(
        lambda q, k: sk.apply_rotary(q, k, cos_shifted, sin_shifted, backend="cuda"),
        lambda q, k: sk.apply_rotary_ref(q, k, cos, sin),
        [(2, 4, 11, 128), (2, 2, 11, 128)],
        dtype,
    )
    check_misaligned(
        lambda g, u: sk.swiglu(g, u, backend="cuda"), sk.swiglu_ref, [(7, 14336), (7, 14336)], dtype, scales=[3.0, 1.0]
    )
    hidden, weight, _, labels = make((19,), 64, 4097, dtype, "cuda")  # V % 8 != 0: the logits' scalar rows
    check_logprobs(hidden, weight, None, labels, backend="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_scalar_and_vector_paths_agree_on_elementwise_ops(ops, dtype):
    """The same values through both paths: the same elements, the same math (up to an ulp)."""
    gate, up, dy = rand(5, 4096, dtype=dtype, scale=3), rand(5, 4096, dtype=dtype), rand(5, 4096, dtype=dtype)
    shifted = [misaligned(5, 4096, dtype=dtype).copy_(t) for t in (gate, up, dy)]
    fwd, bwd = _registry.KERNELS["swiglu_fwd"], _registry.KERNELS["swiglu_bwd"]
    torch.testing.assert_close(fwd.launch("cuda", gate, up), fwd.launch("cuda", *shifted[:2]))
    shifted_outputs = [misaligned(5, 4096, dtype=dtype) for _ in range(2)]  # written through the scalar path
    ops.swiglu_bwd(shifted[2], *shifted[:2], *shifted_outputs)
    for a, b in zip(bwd.launch("cuda", dy, gate, up), shifted_outputs):
        torch.testing.assert_close(a, b)
    q, k = rand(1, 4, 7, 64, dtype=dtype), rand(1, 2, 7, 64, dtype=dtype)
    cos, sin = rope_tables(torch.arange(7, device="cuda"), 64)
    q_shifted, k_shifted = misaligned(1, 4, 7, 64, dtype=dtype).copy_(q), misaligned(1, 2, 7, 64, dtype=dtype).copy_(k)
    rotary = _registry.KERNELS["rotary"]
    for backward in (False, True):
        shifted_outputs = [misaligned(*t.shape, dtype=dtype) for t in (q, k)]  # written through the scalar path
        ops.rotary(q_shifted, k_shifted, cos, sin, *shifted_outputs, backward)
        for a, b in zip(rotary.launch("cuda", q, k, cos, sin, backward=backward), shifted_outputs):
            torch.testing.assert_close(a, b)


def test_mixed_dtypes_read_side_inputs_exactly(ops):
    """A weight (or cos/sin) in a third dtype is widened to fp32, which is exact."""
    x, w = rand(6, 512), rand(512, dtype=torch.float16)
    check_rms_norm(x, w, backend="cuda")
    assert sk.rms_norm(x, w, backend="cuda").dtype == torch.bfloat16
    q, k = rand(2, 4, 5, 64), rand(2, 2, 5, 64)
    cos, sin = rope_tables(torch.arange(5, device="cuda"), 64, dtype=torch.float16)
    check_rotary(q, k, cos, sin, backend="cuda")


def test_many_rows_and_tokens(ops):
    """More rows than a grid's y or z dimension holds (65535): rows live on grid.x."""
    check_swiglu(rand(70000, 24, dtype=torch.float16), rand(70000, 24, dtype=torch.float16), backend="cuda")
    check_rms_norm(rand(70000, 24, dtype=torch.float16), rand(24, dtype=torch.float16), backend="cuda")
    cos, sin = rope_tables(torch.arange(70000, device="cuda"), 8)
    check_rotary(rand(1, 2, 70000, 8), rand(1, 1, 70000, 8), cos, sin, backend="cuda")


# ---- bad input ----------------------------------------------------------------------------------

BAD = [
    (
        "rms_norm_fwd",
        lambda ops: ops.rms_norm_fwd(*rms_fwd_args(rand(4, 8), torch.randn(8))),
        "weight is on cpu, expected cuda:0",
    ),
    (
        "rms_norm_fwd",
        lambda ops: ops.rms_norm_fwd(*rms_fwd_args(torch.ones(4, 8, dtype=torch.int32, device="cuda"), rand(8))),
        "x must be float32, float16 or bfloat16, got Int",
    ),
    (
        "rms_norm_fwd",
        lambda ops: ops.rms_norm_fwd(rand(8, 4).t(), rand(8), None, rand(4, 8), None, rand(4).float(), 1e-5),
        "x must have unit stride",
    ),
    (
        "rms_norm_fwd",
        lambda ops: ops.rms_norm_fwd(*rms_fwd_args(rand(4, 8), rand(9))),
        "weight has 9 elements, expected 8",
    ),
    (
        "rms_norm_fwd",
        lambda ops: ops.rms_norm_fwd(
            rand(4, 8), rand(8), rand(4, 8), rand(4, 8), rand(4, 8).cpu(), rand(4).float(), 1e-5
        ),
        "h is on cpu, expected cuda:0",
    ),
    (
        "rms_norm_bwd",
        lambda ops: ops.rms_norm_bwd(*rms_bwd_args(rand(4, 8), rand(4, 8), rand(8), torch.rand(3, device="cuda"))),
        r"rstd has shape \[3\], expected \[4\]",
    ),
    (
        "rotary",
        lambda ops: ops.rotary(
            rand(1, 2, 5, 8), rand(1, 1, 5, 8), rand(6, 8), rand(5, 8), rand(1, 2, 5, 8), rand(1, 1, 5, 8), False
        ),
        "cos must be",
    ),
    (
        "rotary",
        lambda ops: ops.rotary(
            rand(1, 2, 5, 8), rand(1, 1, 5, 8).cpu(), rand(5, 8), rand(5, 8), rand(1, 2, 5, 8), rand(1, 1, 5, 8), False
        ),
        "k is on cpu",
    ),
    (
        "rotary",
        lambda ops: ops.rotary(
            rand(1, 2, 5, 8), rand(1, 1, 5, 8), rand(5, 8), rand(5, 8), rand(1, 2, 5, 8), rand(1, 2, 5, 8), False
        ),
        r"k_out has shape \[1, 2, 5, 8\], expected \[1, 1, 5, 8\]",
    ),
    (
        "swiglu_fwd",
        lambda ops: ops.swiglu_fwd(rand(3, 8), rand(3, 8, dtype=torch.float16), rand(3, 8)),
        "up has dtype Half, expected BFloat16",
    ),
    (
        "swiglu_fwd",
        lambda ops: ops.swiglu_fwd(rand(3, 8), rand(3, 8), rand(3, 8).cpu()),
        "y is on cpu, expected cuda:0",
    ),
    (
        "swiglu_bwd",
        lambda ops: ops.swiglu_bwd(rand(3, 8), rand(3, 8), rand(3, 8), rand(3, 8), rand(3, 7)),
        r"dup has shape \[3, 7\], expected \[3, 8\]",
    ),
    (
        "logprobs_",
        lambda ops: ops.logprobs_(
            rand(4, 10), torch.zeros(4, device="cuda"), *(torch.zeros(4, device="cuda"),) * 3, -100, True, True
        ),
        "labels must be int64 or int32, got Float",
    ),
    (
        "logprobs_",
        lambda ops: ops.logprobs_(
            rand(4, 10),
            torch.zeros(4, dtype=torch.long, device="cuda"),
            torch.zeros(3, device="cuda"),
            *(torch.zeros(4, device="cuda"),) * 2,
            -100,
            True,
            True,
        ),
        r"logp has shape \[3\], expected \[4\]",
    ),
]


@pytest.mark.parametrize("op, call, message", BAD, ids=[f"{op}-{i}" for i, (op, _, _) in enumerate(BAD)])
def test_bad_input_on_gpu_raises_before_any_kernel(ops, op, call, message):
    with pytest.raises(RuntimeError, match=f"solar_kernels_C::{op}: {message}"):
        call(ops)
    torch.cuda.synchronize()  # nothing was launched, so nothing faulted


def test_public_api_checks_before_the_cuda_kernels(ops):
    with pytest.raises(ValueError, match="rms_norm: weight has 7 elements, expected 8"):
        sk.rms_norm(rand(4, 8), rand(7), backend="cuda")
    with pytest.raises(ValueError, match="apply_rotary: head_dim must be even"):
        sk.apply_rotary(rand(1, 2, 3, 7), rand(1, 1, 3, 7), rand(3, 7), rand(3, 7), backend="cuda")
    torch.cuda.synchronize()


# ---- auto ---------------------------------------------------------------------------------------------


def test_every_kernel_can_be_timed_on_both_backends(ops):
    """The auto table's measurement runs each registered kernel on each backend (a failure there
    would silently hand the class to the other backend)."""
    measure = _autotune._measure_on(torch.device("cuda", torch.cuda.current_device()))
    for kernel in _registry.KERNELS:
        for backend in ("triton", "cuda"):
            ms = measure(kernel, "mid/few", backend)
            assert 0 < ms < 1000, (kernel, backend, ms)


def test_auto_measures_once_per_class_and_reuses_the_file(ops, tmp_path, monkeypatch):
    path = tmp_path / "autotune.json"
    monkeypatch.setenv(_autotune.CACHE_ENV_VAR, str(path))
    monkeypatch.delenv("SOLAR_KERNELS_BACKEND", raising=False)
    monkeypatch.setattr(_autotune, "_TUNERS", {})
    x, w = rand(64, 4096), rand(4096)
    torch.testing.assert_close(sk.rms_norm(x, w, 1e-5), sk.rms_norm_ref(x, w, 1e-5))  # backend None: auto
    key = f"{torch.cuda.get_device_name()} | solar_kernels {sk.__version__}"
    entry = json.loads(path.read_text())[key]
    assert entry["choices"]["rms_norm_fwd"]["mid/few"] in ("triton", "cuda")
    assert all(0 < ms < 1000 for ms in entry["ms"]["rms_norm_fwd"]["mid/few"].values())
    monkeypatch.setattr(_autotune, "_TUNERS", {})
    monkeypatch.setattr(_autotune, "_measure_on", lambda device: lambda *args: pytest.fail(f"measured again: {args}"))
    sk.rms_norm(x, w, 1e-5)
