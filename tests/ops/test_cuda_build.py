"""The CUDA C++ extension as CI sees it, without a GPU: it was built (when it can be), it imports,
every op is the out-variant CUDA op of a kernel record with its schema, the library carries sm_80
and sm_90a code, the ops trace without fakes, and every argument check raises its RuntimeError
(the ops are registered for CPU too, so the checks run here and end with "CUDA devices only")."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

CAN_BUILD = (
    torch.version.cuda is not None
    and os.environ.get("SOLAR_KERNELS_SKIP_CUDA") != "1"
    and (bool(os.environ.get("CUDA_HOME")) or shutil.which("nvcc") is not None)
)
pytestmark = pytest.mark.skipif(
    not CAN_BUILD, reason="no CUDA build of torch, no nvcc, or SOLAR_KERNELS_SKIP_CUDA=1: the extension is not built"
)


@pytest.fixture(scope="module")
def ops():
    from solar_kernels import _cuda

    error = _cuda.load_error()
    assert error is None, f"torch is a CUDA build and nvcc is here, so setup.py must have built the extension: {error}"
    return torch.ops.solar_kernels_C


def test_every_op_is_an_out_variant_of_a_record(ops):
    """Every op the extension registers is the CUDA op of a record (no op allocates its outputs in
    C++, so none has a schema or a fake written outside csrc/torch_bindings.cpp)."""
    registered = {
        name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("solar_kernels_C::")
    }
    assert registered == {k.cuda_op_name for k in _out_variant_kernels()}, registered
    for name in registered:
        assert getattr(ops, name).default._schema.returns == [], name


def _out_variant_kernels():
    from solar_kernels.ops import _registry

    return [k for k in _registry.kernels() if k.out_variant]


def test_out_variant_schemas_match_their_records(ops):
    """Each out-variant record's CUDA op takes its inputs (Tensor(x!) those it writes in place), then
    one written Tensor(x!) per output it allocates, then the non-tensor options it takes by name,
    returns nothing, and is implemented for CUDA."""
    kernels = _out_variant_kernels()
    names = {k.name for k in kernels}
    assert {"rms_norm_fwd", "rms_norm_bwd", "swiglu_fwd", "swiglu_bwd", "rotary", "logprobs"} <= names
    for kernel in kernels:
        inputs = kernel.example(2, 8, torch.float32, "meta", torch.empty)
        outputs = kernel.allocate(*inputs)
        options = [key for key in kernel.variants[0] if kernel.cuda_options is None or key in kernel.cuda_options]
        schema = kernel.cuda_op().default._schema
        arguments = schema.arguments
        tensors = len(inputs) + len(outputs)
        assert schema.returns == [], (kernel.name, str(schema))
        assert len(arguments) == tensors + len(options), (kernel.name, str(schema))
        optional = [t is None for t in (*inputs, *outputs)]  # rms_norm's residual and h: Tensor?
        expected_types = [("Optional[Tensor]" if o else "Tensor") for o in optional]
        assert [str(a.type) for a in arguments[:tensors]] == expected_types, (kernel.name, str(schema))
        assert [a.name for a in arguments[tensors:]] == options, (kernel.name, str(schema))
        written = [a.alias_info is not None and a.alias_info.is_write for a in arguments]
        expected = [i in kernel.in_place for i in range(len(inputs))] + [True] * len(outputs) + [False] * len(options)
        assert written == expected, (kernel.name, str(schema))
        qualified = f"solar_kernels_C::{kernel.cuda_op_name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CUDA"), kernel.name


def test_library_has_ampere_and_hopper_code(ops):
    import triton

    import solar_kernels._C as extension

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        cuobjdump = shutil.which("cuobjdump")
    assert cuobjdump, "no cuobjdump (triton ships one under backends/nvidia/bin)"
    listing = subprocess.run(
        [cuobjdump, "--list-elf", extension.__file__], capture_output=True, text=True, check=True
    ).stdout
    archs = os.environ.get("SOLAR_KERNELS_CUDA_ARCHS", "8.0;9.0a")
    expected = ["sm_" + a.strip().replace(".", "").replace("+PTX", "") for a in archs.split(";") if a.strip()]
    for family in ("logprobs", "rms_norm", "rotary", "swiglu"):
        for arch in expected:
            assert f"{family}.{arch}.cubin" in listing, f"{family} has no {arch} code:\n{listing}"
    assert extension.cuda_archs == "+".join(expected)


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_out_variant_ops_are_traced_without_fakes(ops):
    """Fake-tensor tracing (what torch.compile does) never runs the kernels, and the out-variant ops
    (every op: swiglu_fwd, logprobs_, rms_norm_fwd, ...) trace with no fake at all."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(gate, logits, labels, rows):
        ops.logprobs_(logits, labels, rows, rows, rows, -100, True, True)
        swiglu = torch.empty_like(gate)
        ops.swiglu_fwd(gate, gate, swiglu)
        y, rstd = torch.empty_like(gate), gate.new_empty(gate.shape[0])
        ops.rms_norm_fwd(gate, gate[0], None, y, None, rstd, 1e-5)
        return swiglu.sum() + logits.sum() + y.sum() + rstd.sum()

    args = (_cpu(3, 8), _cpu(4, 10), torch.zeros(4, dtype=torch.long), _cpu(4))
    graph = make_fx(f, tracing_mode="fake")(*args)
    called = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert {
        "solar_kernels_C.logprobs_.default",
        "solar_kernels_C.swiglu_fwd.default",
        "solar_kernels_C.rms_norm_fwd.default",
    } <= called, called


def _cpu(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _rotary_args(q, k, cos, sin, backward=False):
    """rotary's arguments with outputs shaped like q and k."""
    return q, k, cos, sin, torch.empty_like(q), torch.empty_like(k), backward


def _rms_fwd_args(x, weight, residual=None, **given):
    """rms_norm_fwd's arguments with y, h and rstd as the record allocates them, or as ``given``."""
    outputs = {
        "y": torch.empty_like(x),
        "h": torch.empty_like(x) if residual is not None else None,
        "rstd": x.new_empty(x.shape[0], dtype=torch.float32),
        **given,
    }
    return x, weight, residual, outputs["y"], outputs["h"], outputs["rstd"], 1e-5


def _rms_bwd_args(dy, h, weight, rstd, **given):
    outputs = {"dx": torch.empty_like(h), "dweight": torch.empty_like(weight), **given}
    return dy, h, weight, rstd, None, outputs["dx"], outputs["dweight"]


BAD_CALLS = [
    (
        "rms_norm_fwd",
        lambda ops: ops.rms_norm_fwd(*_rms_fwd_args(_cpu(4, 8, dtype=torch.float64), _cpu(8))),
        "x must be float32, float16 or bfloat16, got Double",
    ),
    (
        "rms_norm_fwd",
        lambda ops: ops.rms_norm_fwd(*_rms_fwd_args(_cpu(4, 8), _cpu(7))),
        r"weight has 7 elements, expected 8 \(x.size\(1\)\)",
    ),
    (
        "rms_norm_fwd",
        lambda ops: ops.rms_norm_fwd(*_rms_fwd_args(_cpu(8, 4).t(), _cpu(8), y=_cpu(4, 8))),
        "x must have unit stride along its last dimension",
    ),
    (
        "rms_norm_fwd",
        lambda ops: ops.rms_norm_fwd(*_rms_fwd_args(_cpu(4, 8), _cpu(8), _cpu(4, 8, dtype=torch.float16))),
        "residual has dtype Half, expected Float",
    ),
    (
        "rms_norm_fwd",
        lambda ops: ops.rms_norm_fwd(*_rms_fwd_args(_cpu(4, 8), _cpu(8), _cpu(4, 9))),
        r"residual has shape \[4, 9\], expected \[4, 8\]",
    ),
    (
        "rms_norm_fwd",
        lambda ops: ops.rms_norm_fwd(*_rms_fwd_args(_cpu(4, 8), _cpu(8), y=_cpu(4, 8, dtype=torch.bfloat16))),
        r"y has dtype BFloat16, expected Float \(the dtype of x\)",
    ),
    (
        "rms_norm_fwd",
        lambda ops: ops.rms_norm_fwd(*_rms_fwd_args(_cpu(4, 8), _cpu(8), _cpu(4, 8), h=None)),
        "h \\(x \\+ residual\\) is written exactly when residual is given, got a residual and no h",
    ),
    (
        "rms_norm_fwd",
        lambda ops: ops.rms_norm_fwd(*_rms_fwd_args(_cpu(4, 8), _cpu(8), _cpu(4, 8), h=_cpu(3, 8))),
        r"h has shape \[3, 8\], expected \[4, 8\]",
    ),
    (
        "rms_norm_fwd",
        lambda ops: ops.rms_norm_fwd(*_rms_fwd_args(_cpu(4, 8), _cpu(8), rstd=_cpu(8)[::2])),
        "rstd must be contiguous",
    ),
    (
        "rms_norm_bwd",
        lambda ops: ops.rms_norm_bwd(*_rms_bwd_args(_cpu(4, 8), _cpu(4, 8), _cpu(8), _cpu(5))),
        r"rstd has shape \[5\], expected \[4\]",
    ),
    (
        "rms_norm_bwd",
        lambda ops: ops.rms_norm_bwd(*_rms_bwd_args(_cpu(4, 8, dtype=torch.bfloat16), _cpu(4, 8), _cpu(8), _cpu(4))),
        "dy has dtype BFloat16, expected Float",
    ),
    (
        "rms_norm_bwd",
        lambda ops: ops.rms_norm_bwd(*_rms_bwd_args(_cpu(4, 8), _cpu(4, 8), _cpu(8), _cpu(4), dx=_cpu(4, 7))),
        r"dx has shape \[4, 7\], expected \[4, 8\]",
    ),
    (
        "rms_norm_bwd",
        lambda ops: ops.rms_norm_bwd(
            *_rms_bwd_args(_cpu(4, 8), _cpu(4, 8), _cpu(8), _cpu(4), dweight=_cpu(8, dtype=torch.float16))
        ),
        r"dweight has dtype Half, expected Float \(the dtype of weight\)",
    ),
    (
        "rotary",
        lambda ops: ops.rotary(*_rotary_args(_cpu(2, 4, 5), _cpu(2, 4, 5), _cpu(5, 8), _cpu(5, 8))),
        r"q must be 4-D \[B, Hq, T, D\], got 3 dimensions",
    ),
    (
        "rotary",
        lambda ops: ops.rotary(*_rotary_args(_cpu(2, 4, 5, 7), _cpu(2, 2, 5, 7), _cpu(5, 7), _cpu(5, 7))),
        "head_dim must be even",
    ),
    (
        "rotary",
        lambda ops: ops.rotary(*_rotary_args(_cpu(2, 4, 5, 8), _cpu(2, 2, 6, 8), _cpu(5, 8), _cpu(5, 8))),
        r"k must be \[B, Hkv, T, D\] with B, T, D of q",
    ),
    (
        "rotary",
        lambda ops: ops.rotary(*_rotary_args(_cpu(2, 4, 5, 8), _cpu(2, 2, 5, 8), _cpu(3, 5, 8), _cpu(5, 8))),
        r"cos must be \[T, D\] = \[5, 8\] or \[B, T, D\] = \[2, 5, 8\] \(B may be 1\), got \[3, 5, 8\]",
    ),
    (
        "rotary",
        lambda ops: ops.rotary(
            *_rotary_args(_cpu(2, 4, 5, 8), _cpu(2, 2, 5, 8, dtype=torch.float16), _cpu(5, 8), _cpu(5, 8))
        ),
        "k has dtype Half, expected Float",
    ),
    (
        "rotary",
        lambda ops: ops.rotary(
            _cpu(2, 4, 5, 8), _cpu(2, 2, 5, 8), _cpu(5, 8), _cpu(5, 8), _cpu(2, 4, 5, 8), _cpu(2, 4, 5, 8), False
        ),
        r"k_out has shape \[2, 4, 5, 8\], expected \[2, 2, 5, 8\] \(the shape of k\)",
    ),
    (
        "rotary",
        lambda ops: ops.rotary(
            _cpu(2, 4, 5, 8),
            _cpu(2, 2, 5, 8),
            _cpu(5, 8),
            _cpu(5, 8),
            _cpu(2, 4, 5, 8, dtype=torch.float16),
            _cpu(2, 2, 5, 8),
            False,
        ),
        r"q_out has dtype Half, expected Float \(the dtype of q\)",
    ),
    (
        "swiglu_fwd",
        lambda ops: ops.swiglu_fwd(_cpu(3, 4), _cpu(3, 5), _cpu(3, 4)),
        r"up has shape \[3, 5\], expected \[3, 4\]",
    ),
    (
        "swiglu_fwd",
        lambda ops: ops.swiglu_fwd(_cpu(3, 4), _cpu(3, 4), _cpu(3, 5)),
        r"y has shape \[3, 5\], expected \[3, 4\]",
    ),
    (
        "swiglu_fwd",
        lambda ops: ops.swiglu_fwd(_cpu(3, 4, 2), _cpu(3, 4, 2), _cpu(3, 4, 2)),
        r"gate must be 2-D \[rows, width\]",
    ),
    ("swiglu_fwd", lambda ops: ops.swiglu_fwd(_cpu(3, 4), _cpu(3, 4), _cpu(4, 3).t()), "y must have unit stride"),
    (
        "swiglu_fwd",
        lambda ops: ops.swiglu_fwd(_cpu(3, 4), _cpu(3, 4), _cpu(3, 4, dtype=torch.float16)),
        "y has dtype Half, expected Float",
    ),
    (
        "swiglu_fwd",
        lambda ops: ops.swiglu_fwd(*(_cpu(3, 4, dtype=torch.float64),) * 3),
        "gate must be float32, float16 or bfloat16",
    ),
    (
        "swiglu_bwd",
        lambda ops: ops.swiglu_bwd(_cpu(3, 4), _cpu(3, 4, dtype=torch.bfloat16), *(_cpu(3, 4),) * 3),
        r"gate has dtype BFloat16, expected Float \(the dtype of dy\)",
    ),
    (
        "logprobs_",
        lambda ops: ops.logprobs_(_cpu(4, 10), _cpu(4), _cpu(4), _cpu(4), _cpu(4), -100, True, False),
        "labels must be int64 or int32, got Float",
    ),
    (
        "logprobs_",
        lambda ops: ops.logprobs_(
            _cpu(4, 10), torch.zeros(3, dtype=torch.long), _cpu(4), _cpu(4), _cpu(4), -100, True, False
        ),
        r"labels has shape \[3\], expected \[4\]",
    ),
    (
        "logprobs_",
        lambda ops: ops.logprobs_(
            _cpu(4, 10), torch.zeros(4, dtype=torch.long), _cpu(8)[::2], _cpu(4), _cpu(4), -100, True, False
        ),
        "logp must be contiguous",
    ),
    (
        "logprobs_",
        lambda ops: ops.logprobs_(
            _cpu(4, 10),
            torch.zeros(4, dtype=torch.long),
            _cpu(4),
            _cpu(4),
            _cpu(4, dtype=torch.float16),
            -100,
            True,
            True,
        ),
        "grad must be float32, got Half",
    ),
]


@pytest.mark.parametrize("op, call, message", BAD_CALLS, ids=[f"{op}-{i}" for i, (op, _, _) in enumerate(BAD_CALLS)])
def test_bad_arguments_raise_runtime_error_naming_the_op(ops, op, call, message):
    with pytest.raises(RuntimeError, match=f"solar_kernels_C::{op}: {message}"):
        call(ops)


def test_good_arguments_on_cpu_say_cuda_only(ops):
    calls = {
        "rms_norm_fwd": lambda: ops.rms_norm_fwd(*_rms_fwd_args(_cpu(4, 8), _cpu(8), _cpu(4, 8))),
        "rms_norm_bwd": lambda: ops.rms_norm_bwd(
            *_rms_bwd_args(
                _cpu(4, 8), _cpu(4, 8), _cpu(8, dtype=torch.bfloat16), _cpu(4), dweight=_cpu(8, dtype=torch.bfloat16)
            )
        ),
        "rotary": lambda: ops.rotary(
            *_rotary_args(_cpu(2, 4, 5, 8), _cpu(2, 2, 5, 8), _cpu(5, 8), _cpu(1, 5, 8), True)
        ),
        "swiglu_bwd": lambda: ops.swiglu_bwd(*(_cpu(3, 4),) * 5),
        "logprobs_": lambda: ops.logprobs_(
            _cpu(4, 10), torch.zeros(4, dtype=torch.int32), _cpu(4), _cpu(4), _cpu(8)[::2], -100, True, True
        ),
    }
    for op, call in calls.items():
        with pytest.raises(
            RuntimeError,
            match=f"solar_kernels_C::{op}: .* is on cpu; the CUDA kernels of solar_kernels._C run on CUDA devices only",
        ):
            call()
