"""The CUDA C++ kernels of csrc/, run on the CPU under an emulation of CUDA's execution model
(tests/ops/cuda_emulator/: every thread of a block is a real thread, __syncthreads a barrier, warp
shuffles an exchange), so CI without a GPU checks their indexing, vector and scalar paths,
reductions and NaN rules against the references.

The .cu sources compile unchanged with g++ except for the launch syntax, rewritten from
``kernel<<<grid, block, smem, stream>>>(args)`` to ``solar_emu::launch(grid, block, smem, stream)(kernel, args)``.
The torch-facing host functions (*_host.cpp) need a GPU; every op is an out-variant of a record of
solar_kernels/ops/_registry.py (its outputs come from the Python side), so what stands in for
``torch.ops.solar_kernels_C`` here, letting the public API run with ``backend="cuda"`` on CPU
tensors, is: the elementwise ops' extern "C" launchers, called by name with a ``Rows`` block (no
wrapper), and for RMSNorm, rotary and the log-prob row step wrappers that fill their typed argument
blocks (with the host functions' side-input dtype rule and RMSNorm's workspace). What this
cannot check: speed, register use, memory ordering beyond barriers, and the host functions
themselves (tests/ops/test_cuda_ops.py does on a GPU; their argument checks are tested in
tests/ops/test_cuda_build.py).
"""

from __future__ import annotations

import ctypes
import importlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import solar_kernels as sk
from solar_kernels.ops import _registry
from tests.helpers import check_logprobs, check_rms_norm, check_rotary, check_swiglu, misaligned, rope_tables
from tests.helpers import make_lm_head as make
from tests.tolerances import DTYPE_IDS, DTYPES, assert_close

ROOT = Path(__file__).resolve().parents[2]
EMULATOR = Path(__file__).with_name("cuda_emulator")
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)<<<(.*?)>>>\(")
MAX_ROW_TENSORS = int(re.search(r"kMaxRowTensors = (\d+);", (ROOT / "csrc" / "launch.h").read_text()).group(1))


class Rows(ctypes.Structure):
    """csrc/launch.h's Rows: the argument block of the elementwise launchers."""

    _fields_ = [
        ("data", ctypes.c_void_p * MAX_ROW_TENSORS),
        ("stride", ctypes.c_int64 * MAX_ROW_TENSORS),
        ("count", ctypes.c_int32),
        ("n_rows", ctypes.c_int64),
        ("n_cols", ctypes.c_int64),
    ]


pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the emulated kernels")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """The csrc kernels and tests/ops/cuda_emulator/entry.cpp, built for the CPU emulation."""
    build = tmp_path_factory.mktemp("cuda_emulator")
    objects = []
    sources = sorted((ROOT / "csrc").glob("*.cu")) + [EMULATOR / "entry.cpp"]
    for source in sources:
        text = source.read_text()
        if source.suffix == ".cu":
            text, launches = LAUNCH.subn(r"::solar_emu::launch(\2)(\1, ", text)
            assert launches > 0, f"{source.name}: no kernel launch found to rewrite"
        rewritten = build / (source.stem + ".cpp")
        rewritten.write_text(text)
        objects.append(build / (source.stem + ".o"))
        command = [
            "g++",
            "-std=c++20",
            "-O1",
            "-fPIC",
            "-pthread",
            "-c",
            str(rewritten),
            "-o",
            str(objects[-1]),
            f"-I{EMULATOR}",
            f"-I{ROOT / 'csrc'}",
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, f"{source.name}:\n{result.stderr[-5000:]}"
    library = build / "emulated_kernels.so"
    subprocess.run(["g++", "-shared", "-pthread", "-o", str(library), *map(str, objects)], check=True)
    return ctypes.CDLL(str(library))


def ptr(tensor):
    return ctypes.c_void_p(tensor.data_ptr() if tensor is not None else 0)


def i64(*values):
    return [ctypes.c_int64(v) for v in values]


def check(status, what):
    assert status == 0, f"{what}: emulated launch failed (configuration rejected)"


def side_input(tensor, activation_dtype):
    """What the host functions do with RMSNorm's weight and rotary's cos/sin: read as they are in
    the activation dtype or fp32, else widened to fp32 (exact)."""
    return tensor if tensor.dtype in (activation_dtype, torch.float32) else tensor.float()


class EmulatedOps:
    """torch.ops.solar_kernels_C's ops on CPU tensors, through the emulated kernels."""

    def __init__(self, lib):
        self.lib = lib
        lib.emu_rms_norm_bwd_blocks.restype = ctypes.c_int64

    def rms_norm_fwd(self, x, weight, residual, y, h, rstd, eps):
        """The out-variant rms_norm_fwd: y, h (given with a residual) and rstd written."""
        w = side_input(weight, x.dtype).contiguous()
        check(
            self.lib.emu_rms_norm_fwd(
                CODES[x.dtype],
                int(w.dtype != x.dtype),
                ptr(x),
                ptr(residual),
                ptr(w),
                ptr(y),
                ptr(h),
                ptr(rstd),
                *i64(
                    x.stride(0),
                    residual.stride(0) if residual is not None else 0,
                    y.stride(0),
                    h.stride(0) if h is not None else 0,
                    *x.shape,
                ),
                ctypes.c_float(eps),
            ),
            "rms_norm_fwd",
        )

    def rms_norm_bwd(self, dy, h, weight, rstd, dh, dx, dweight):
        """The out-variant rms_norm_bwd: dx and dweight written, through the host function's
        workspace (one fp32 row per block, poisoned here: every row must be written)."""
        w = side_input(weight, h.dtype).contiguous()
        types = CODES[h.dtype], int(w.dtype != h.dtype)
        strides = i64(dy.stride(0), h.stride(0), dh.stride(0) if dh is not None else 0, dx.stride(0), *h.shape)
        blocks = self.lib.emu_rms_norm_bwd_blocks(*types, ptr(dy), ptr(h), ptr(w), ptr(dh), ptr(dx), *strides)
        partial = torch.full((blocks, h.shape[1]), float("nan"))
        direct = dweight.dtype == w.dtype and dweight.is_contiguous()
        out = dweight if direct else torch.empty(h.shape[1], dtype=w.dtype)
        check(
            self.lib.emu_rms_norm_bwd(
                *types,
                ptr(dy),
                ptr(h),
                ptr(w),
                ptr(rstd.contiguous()),
                ptr(dh),
                ptr(dx),
                ptr(partial),
                ctypes.c_int64(blocks),
                ptr(out),
                *strides,
            ),
            "rms_norm_bwd",
        )
        if not direct:
            dweight.copy_(out)

    def rotary(self, q, k, cos, sin, q_out, k_out, backward):
        """The out-variant rotary op: q' and k' written into q_out and k_out."""
        as_is = cos.dtype == sin.dtype and cos.dtype in (q.dtype, torch.float32)
        cos, sin = (cos, sin) if as_is else (cos.float(), sin.float())

        def strides(t):
            return [0 if size == 1 else stride for size, stride in zip(t.shape, t.stride())]

        def table(t):
            s = strides(t)
            return [0, *s] if t.dim() == 2 else s

        flat = strides(q) + strides(k) + strides(q_out) + strides(k_out) + table(cos) + table(sin)
        check(
            self.lib.emu_rotary(
                CODES[q.dtype],
                int(cos.dtype != q.dtype),
                ptr(q),
                ptr(k),
                ptr(cos),
                ptr(sin),
                ptr(q_out),
                ptr(k_out),
                (ctypes.c_int64 * len(flat))(*flat),
                *i64(q.shape[0], q.shape[2], q.shape[1], k.shape[1], q.shape[3] // 2),
                int(backward),
            ),
            "rotary",
        )

    def out_variant(self, name):
        """torch.ops.solar_kernels_C.<name> of an out-variant elementwise op: its launcher solar_<name>,
        given the op's tensors (inputs, then the outputs the Python side allocated) as a Rows block."""
        launch = getattr(self.lib, f"solar_{name}")

        def run(*tensors):
            rows = Rows(count=len(tensors), n_rows=tensors[0].shape[0], n_cols=tensors[0].shape[1])
            for i, tensor in enumerate(tensors):
                rows.data[i], rows.stride[i] = tensor.data_ptr(), tensor.stride(0)
            check(launch(CODES[tensors[0].dtype], ctypes.byref(rows), None), name)

        return run

    def logprobs_(self, logits, labels, logp, lse, grad, ignore_index, compute_lse, write_grad):
        check(
            self.lib.emu_logprobs(
                CODES[logits.dtype],
                int(labels.dtype == torch.int64),
                ptr(logits),
                ptr(labels),
                ptr(logp),
                ptr(lse),
                ptr(grad),
                *i64(logits.stride(0), labels.stride(0), grad.stride(0), *logits.shape, ignore_index),
                int(compute_lse),
                int(write_grad),
            ),
            "logprobs_",
        )


@pytest.fixture
def emulated(lib, monkeypatch):
    """backend="cuda" runs on CPU tensors, through the emulated kernels."""
    import solar_kernels._backend as backend

    ops = EmulatedOps(lib)
    namespace = torch.ops.solar_kernels_C
    for kernel in _registry.kernels():  # an elementwise launcher by name, else its emulated host function above
        name = kernel.cuda_op_name
        monkeypatch.setattr(namespace, name, getattr(ops, name, None) or ops.out_variant(name), raising=False)
    real = backend.unavailable_reason
    monkeypatch.setattr(
        backend, "unavailable_reason", lambda name, device: None if name == "cuda" else real(name, device)
    )
    return ops


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(5, 1), (3, 7, 123), (6, 4096), (2, 14336), (1, 65536)])
def test_rms_norm(emulated, shape, dtype):
    x, weight = torch.randn(shape).to(dtype), torch.randn(shape[-1]).to(dtype)
    check_rms_norm(x, weight, backend="cuda")
    check_rms_norm(x, weight, torch.randn(shape).to(dtype) * 4, backend="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rms_norm_strided_misaligned_and_mixed(emulated, dtype):
    d = 123
    x = torch.randn(17, 2 * d + 5).to(dtype)[:, 3 : 3 + d]  # row-strided view
    check_rms_norm(x, torch.randn(2 * d).to(dtype)[::2], backend="cuda")
    check_rms_norm(
        misaligned(9, 1024, dtype=dtype),
        misaligned(1024, dtype=dtype),
        misaligned(9, 1024, dtype=dtype),
        backend="cuda",
    )
    check_rms_norm(torch.randn(4, 256).to(dtype), torch.randn(256), backend="cuda")  # fp32 weight
    check_rms_norm(torch.randn(4, 256).to(torch.bfloat16), torch.randn(256).half(), backend="cuda")  # widened


def test_rms_norm_backward_on_many_rows_per_block(emulated):
    """More rows than the persistent grid has blocks: each block sums dweight over its rows."""
    check_rms_norm(torch.randn(300, 64), torch.randn(64), torch.randn(300, 64), backend="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "batch, heads_q, heads_k, tokens, head_dim",
    [
        (1, 1, 1, 1, 2),
        (2, 4, 2, 7, 34),
        (2, 4, 2, 5, 128),
        (1, 3, 3, 13, 6),
        (2, 3, 2, 5, 16),
        (1, 2, 5, 7, 8),
        (1, 1, 9, 3, 6),
    ],
)  # any Hq, Hkv (HF allows it)
def test_rotary(emulated, batch, heads_q, heads_k, tokens, head_dim, dtype):
    q = torch.randn(batch, heads_q, tokens, head_dim).to(dtype)
    k = torch.randn(batch, heads_k, tokens, head_dim).to(dtype)
    cos, sin = rope_tables(torch.arange(tokens) * 37, head_dim, dtype=dtype)
    check_rotary(q, k, cos, sin, backend="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rotary_layouts_tables_and_misaligned(emulated, dtype):
    q = torch.randn(2, 11, 4, 32).to(dtype).transpose(1, 2)  # [B, T, H, D] storage
    k = torch.randn(2, 11, 2, 32).to(dtype).transpose(1, 2)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2], list(range(5, 16))])
    cos, sin = rope_tables(positions, 32)  # [B, T, D] fp32 tables, positions restarting
    check_rotary(q, k, cos, sin, backend="cuda")
    q2, k2 = sk.apply_rotary(q, k, cos, sin, backend="cuda")
    assert q2.transpose(1, 2).is_contiguous() and k2.transpose(1, 2).is_contiguous()
    general = torch.randn(5, 8), torch.randn(5, 8)  # halves differ: the backward must be the transpose
    check_rotary(torch.randn(1, 2, 5, 8).to(dtype), torch.randn(1, 1, 5, 8).to(dtype), *general, backend="cuda")
    table = rope_tables(torch.arange(7), 64, dtype=dtype)
    check_rotary(
        misaligned(1, 4, 7, 64, dtype=dtype),
        misaligned(1, 2, 7, 64, dtype=dtype),
        misaligned(7, 64, dtype=dtype).copy_(table[0]),
        misaligned(7, 64, dtype=dtype).copy_(table[1]),
        backend="cuda",
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rotary_many_token_blocks_and_head_groups(emulated, dtype):
    """More tokens than one block takes (the last block part-filled), and 18 + 3 heads: groups of 8,
    8 and 5 heads per block, the last holding both q and k heads."""
    q, k = torch.randn(2, 18, 300, 16).to(dtype), torch.randn(2, 3, 300, 16).to(dtype)
    check_rotary(q, k, *rope_tables(torch.arange(300) * 3, 16, dtype=dtype), backend="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(3, 1), (2, 5, 123), (4, 4097), (2, 14336)])
def test_swiglu(emulated, shape, dtype):
    check_swiglu((torch.randn(shape) * 3).to(dtype), torch.randn(shape).to(dtype), backend="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("op", [op.name for op in _registry.ops()])
def test_every_registry_op_on_its_emulated_kernels(emulated, op, dtype):
    """Each op of the registry with backend="cuda" (its records' launchers, forward and backward) on
    odd rows and widths, against its reference in float64."""
    record = _registry.OPS[op]
    for rows, width in ((3, 123), (4, 1024)):
        leaves, constants = record.split(record.example(rows, width, dtype, "cpu"))
        inputs = [t.requires_grad_() for t in leaves]
        outs = _as_tuple(record.fn(*inputs, *constants, backend="cuda"))
        upstream = [torch.randn_like(o) for o in outs]
        grads = torch.autograd.grad(outs, inputs, upstream)
        eager_inputs = [t.detach().clone().requires_grad_() for t in inputs]
        eager = _as_tuple(record.ref(*eager_inputs, *constants))
        eager_grads = torch.autograd.grad(eager, eager_inputs, upstream)
        exact_inputs = [t.detach().double().requires_grad_() for t in inputs]
        exact = _as_tuple(record.ref(*exact_inputs, *(t.double() for t in constants)))
        exact_grads = torch.autograd.grad(exact, exact_inputs, [u.double() for u in upstream])
        for i, (a, b, c) in enumerate(zip([*outs, *grads], [*eager, *eager_grads], [*exact, *exact_grads])):
            assert_close(f"{op} result {i}", a, b, c, dtype)


def _as_tuple(result):
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def test_every_out_variant_kernel_has_a_launcher_by_name(lib):
    """Each record is bound (in torch_bindings.cpp and here) through solar_<name>, or (rms_norm_fwd,
    rms_norm_bwd, rotary, logprobs_: not elementwise) through its emulated host function in EmulatedOps."""
    names = [k.cuda_op_name for k in _registry.kernels()]
    assert {"rms_norm_fwd", "rms_norm_bwd", "swiglu_fwd", "swiglu_bwd", "rotary", "logprobs_"} <= set(names)
    missing = [name for name in names if not hasattr(lib, f"solar_{name}") and not hasattr(EmulatedOps, name)]
    assert not missing, f"no SOLAR_ROWS_LAUNCHER(solar_<name>) in csrc/*.cu for {missing}"


def test_a_launcher_refuses_another_count_of_tensors(lib):
    """The Rows block says how many tensors it holds; a launcher reads only its own op's count."""
    gate = torch.randn(2, 8)
    rows = Rows(count=2, n_rows=2, n_cols=8)  # swiglu_fwd takes gate, up and y
    rows.data[0] = rows.data[1] = gate.data_ptr()
    rows.stride[0] = rows.stride[1] = 8
    assert lib.solar_swiglu_fwd(CODES[torch.float32], ctypes.byref(rows), None) != 0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_swiglu_halves_and_misaligned(emulated, dtype):
    gate, up = (torch.randn(2, 7, 2 * 123) * 2).to(dtype).chunk(2, dim=-1)
    check_swiglu(gate, up, backend="cuda")
    check_swiglu(misaligned(3, 2048, dtype=dtype, scale=3), misaligned(3, 2048, dtype=dtype), backend="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "tokens_shape, d, vocab", [((37,), 64, 512), ((2, 9), 33, 123), ((6,), 16, 32000), ((3, 4), 24, 4097)]
)
def test_logprobs(emulated, tokens_shape, d, vocab, dtype):
    check_logprobs(*make(tokens_shape, d, vocab, dtype, "cpu", bias=True), backend="cuda")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_and_int32_labels(emulated, reduction):
    hidden, weight, _, labels = make((3, 13), 40, 257, torch.bfloat16, "cpu")
    ours = sk.linear_cross_entropy(hidden, weight, labels.int(), reduction=reduction, backend="cuda")
    torch.testing.assert_close(ours, sk.linear_cross_entropy_ref(hidden, weight, labels, reduction=reduction))


def test_logprobs_kernel_follows_the_triton_kernel_rules(emulated):
    """NaN for out-of-range labels, exact zeros for ignored rows, against Triton's interpreter."""
    module = importlib.import_module("solar_kernels.ops.linear_logprobs")
    logits = torch.randn(9, 300) * 3
    labels = torch.tensor([0, -100, 299, 300, 5, -3, -100, 17, 150])
    grad = torch.randn(9)
    results = {}
    for backend in ("cuda", "triton"):
        z, logp, lse = logits.clone(), torch.full((9,), 7.0), torch.full((9,), 7.0)
        module._logprobs_rows(backend, z, labels, logp, lse, grad, -100, True, True)
        results[backend] = (logp, lse, z)
    for cuda, triton in zip(results["cuda"], results["triton"]):
        torch.testing.assert_close(cuda, triton, equal_nan=True)
    logp, lse, z = results["cuda"]
    assert torch.isnan(logp[[3, 5]]).all() and torch.isfinite(logp[[0, 1, 2, 4, 6, 7, 8]]).all()
    assert (logp[[1, 6]] == 0).all() and (lse[[1, 6]] == 0).all() and (z[[1, 6]] == 0).all()
    assert torch.isnan(z[[3, 5]]).all()
