"""The kernel registry (solar_kernels/ops/_registry.py): records, the dispatch that reads them, the
output contract behind the fakes, and the lists that come from it."""

from __future__ import annotations

import importlib

import pytest
import torch

import solar_kernels as sk
from solar_kernels import _autotune
from solar_kernels.ops import _registry
from solar_kernels.ops._registry import Kernel, elementwise, register

swiglu_module = importlib.import_module("solar_kernels.ops.swiglu")


class FakeCudaOp:
    """Stands in for torch.ops.solar_kernels_C.<name>: records its arguments, writes a marker."""

    def __init__(self):
        self.calls = []

    def __call__(self, *tensors, **options):
        self.calls.append((tensors, options) if options else tensors)
        for out in tensors[-2:]:
            if out is not None:  # an optional output (rms_norm_fwd's h without a residual)
                out.fill_(7.0)


@pytest.fixture
def cuda_choice(monkeypatch):
    """Every "auto" launch picks CUDA, and the CUDA ops of the records are fakes."""
    monkeypatch.setattr(_autotune, "pick", lambda backend, kernel, rows, width, device: "cuda")
    monkeypatch.setattr(_registry, "pick", lambda backend, kernel, rows, width, device: "cuda")
    fakes = {}
    for kernel in _registry.kernels():
        if kernel.out_variant:
            fakes[kernel.name] = FakeCudaOp()
            monkeypatch.setattr(torch.ops.solar_kernels_C, kernel.cuda_op_name, fakes[kernel.name], raising=False)
    return fakes


def test_swiglu_dispatch_hands_the_cuda_op_outputs_allocated_by_the_contract(cuda_choice):
    gate = torch.randn(2, 3, 40)
    up = torch.randn(2, 3, 40)
    y = swiglu_module._swiglu_fwd_op(gate, up, "auto")
    (call,) = cuda_choice["swiglu_fwd"].calls
    assert [t.shape for t in call] == [(6, 40)] * 3  # gate, up as rows, then y
    assert call[2].dtype == gate.dtype and call[2].data_ptr() == y.data_ptr()
    assert y.shape == gate.shape and torch.all(y == 7.0)  # what the CUDA op wrote is the result
    dgate, dup = swiglu_module._swiglu_bwd_op(torch.randn_like(gate), gate, up, "auto")
    (call,) = cuda_choice["swiglu_bwd"].calls
    assert len(call) == 5 and (call[3].data_ptr(), call[4].data_ptr()) == (dgate.data_ptr(), dup.data_ptr())
    assert torch.all(dgate == 7.0) and torch.all(dup == 7.0)


def test_swiglu_dispatch_runs_triton_on_a_triton_choice(device):
    gate, up = torch.randn(5, 33, device=device), torch.randn(5, 33, device=device)
    (y,) = swiglu_module.SWIGLU_FWD.launch("triton", gate, up)
    torch.testing.assert_close(y, sk.swiglu_ref(gate, up))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_custom_op_fakes_follow_the_contract(dtype):
    """torch.library.opcheck: the fakes (the records' contract) agree with the real outputs."""
    gate = torch.randn(3, 2, 24, dtype=dtype, requires_grad=True)
    up = torch.randn(3, 2, 24, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.solar_kernels.swiglu_fwd, (gate, up, "triton"))
    dy = torch.randn_like(gate)  # the backward op has no backward of its own: plain tensors
    torch.library.opcheck(torch.ops.solar_kernels.swiglu_bwd, (dy, gate.detach(), up.detach(), "triton"))


def test_contract_of_an_elementwise_record():
    gate = torch.empty(4, 9, 17, dtype=torch.float16, device="meta")
    fwd, bwd = swiglu_module.SWIGLU_FWD, swiglu_module.SWIGLU_BWD
    assert fwd.outputs(gate, gate) == (((4, 9, 17), torch.float16),)
    assert bwd.outputs(gate, gate, gate) == (((4, 9, 17), torch.float16),) * 2
    assert fwd.rows_width(gate, gate) == (36, 17)
    assert [t.shape for t in fwd.allocate(gate, gate)] == [(4, 9, 17)]
    with pytest.raises(TypeError, match="swiglu_bwd: expected 3 input tensors, got 2"):
        bwd.outputs(gate, gate)


def test_a_records_timing_case_runs_one_launch(device):
    run = swiglu_module.SWIGLU_BWD.make_case("triton", 4, 48, device)
    dgate, dup = run()
    assert dgate.shape == dup.shape == (4, 48) and dgate.dtype == torch.bfloat16


def test_every_kernel_is_recorded_by_its_op_file():
    for kernel in _registry.kernels():
        module = importlib.import_module(f"solar_kernels.ops.{kernel.family}")
        assert kernel.out_variant, kernel.name
        assert kernel.triton.__module__ == module.__name__, (kernel.name, kernel.family, kernel.triton.__module__)
    assert {k.family for k in _registry.kernels()} == set(_registry.families())


def test_every_op_names_records_and_a_model_width():
    from solar_kernels.model.config import ModelConfig

    for op in _registry.ops():
        assert getattr(sk, op.name) is op.fn
        assert all(_registry.KERNELS[k.name] is k for k in op.kernels), op.name
        assert isinstance(op.model_width(ModelConfig()), int), op.width
    assert _registry.OPS["apply_rotary"].model_width(ModelConfig()) == (32 + 8) * 128


def test_rotary_record_allocates_in_the_inputs_layout():
    """Rotary's outputs keep q's and k's memory layout (its allocator, not a contract); the custom
    op's fake is that allocation (opcheck compares it with the real outputs)."""
    rotary = importlib.import_module("solar_kernels.ops.rotary")
    q = torch.randn(2, 5, 4, 8).transpose(1, 2)  # [B, H, T, D] view of a [B, T, H, D] tensor
    k = torch.randn(2, 1, 5, 8)
    cos, sin = torch.randn(5, 8), torch.randn(5, 8)
    q_out, k_out = rotary.ROTARY.allocate(q, k, cos, sin)
    assert q_out.stride() == q.stride() and k_out.stride() == k.stride()
    assert rotary.ROTARY.rows_width(q, k, cos, sin) == (10, (4 + 1) * 8)
    for backward in (False, True):
        torch.library.opcheck(torch.ops.solar_kernels.apply_rotary, (q, k, cos, sin, backward, "triton"))


def test_rotary_dispatch_hands_the_cuda_op_its_outputs_and_option(cuda_choice):
    rotary = importlib.import_module("solar_kernels.ops.rotary")
    q, k, cos, sin = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8), torch.randn(3, 8), torch.randn(3, 8)
    got = rotary._rotary_op(q, k, cos, sin, True, "auto")
    (call,) = cuda_choice["rotary"].calls
    assert call[-1] == {"backward": True} and [t.data_ptr() for t in call[0][4:]] == [t.data_ptr() for t in got]


def test_rms_norm_dispatch_hands_the_cuda_op_its_outputs_and_eps_only(cuda_choice):
    """The CUDA op gets x, weight, residual, then y, h, rstd as the record allocates them, and of the
    options only eps (its schema's); its backward gets dx and dweight to write."""
    module = importlib.import_module("solar_kernels.ops.rms_norm")
    x, weight, residual = torch.randn(2, 3, 16), torch.randn(16), torch.randn(2, 3, 16)
    y, h, rstd = module._rms_norm_fwd_op(x, weight, residual, 1e-5, "auto")
    ((tensors, options),) = cuda_choice["rms_norm_fwd"].calls
    assert options == {"eps": 1e-5} and len(tensors) == 6
    assert [t.shape for t in tensors[3:]] == [(6, 16), (6, 16), (6,)]
    assert [t.data_ptr() for t in tensors[3:]] == [y.data_ptr(), h.data_ptr(), rstd.data_ptr()]
    assert y.shape == h.shape == x.shape and torch.all(rstd == 7.0)
    module._rms_norm_fwd_op(x, weight, None, 1e-5, "auto")
    assert cuda_choice["rms_norm_fwd"].calls[1][0][4] is None  # no h without a residual
    dx, dweight = module._rms_norm_bwd_op(torch.randn_like(x), h, weight, rstd, None, "auto")
    (call,) = cuda_choice["rms_norm_bwd"].calls
    assert len(call) == 7 and [t.data_ptr() for t in call[5:]] == [dx.data_ptr(), dweight.data_ptr()]
    assert dweight.shape == weight.shape and torch.all(dweight == 7.0)


def test_rms_norm_launches_the_cuda_twin_lacks_run_triton(cuda_choice):
    """An option the CUDA twin lacks (offset) runs Triton on "auto"; a y wider than x (autocast's
    promotion) runs Triton even on a named "cuda", as the twin writes x's dtype only."""
    module = importlib.import_module("solar_kernels.ops.rms_norm")
    x, weight = torch.randn(3, 16), torch.randn(16)
    y, _, _ = module._rms_norm_fwd_op(x, weight, None, 1e-5, "auto", False, 1.0)
    torch.testing.assert_close(y, sk.rms_norm_ref(x, weight, 1e-5, offset=1.0))
    x16 = x.to(torch.bfloat16)
    y, _, rstd = module._rms_norm_fwd_op(x16, weight, None, 1e-5, "cuda", True)
    assert y.dtype == torch.float32
    dx, dweight = module._rms_norm_bwd_op(torch.randn(3, 16), x16, weight, rstd, None, "cuda")
    assert dx.dtype == torch.bfloat16 and dweight.dtype == torch.float32
    assert cuda_choice["rms_norm_fwd"].calls == [] and cuda_choice["rms_norm_bwd"].calls == []


def test_a_launch_only_triton_has_asks_nothing_of_the_auto_table(monkeypatch):
    """An option the CUDA twin lacks goes to Triton on "auto" without a lookup (which could time
    both backends on a GPU), as the rms_norm launchers did before their records."""
    module = importlib.import_module("solar_kernels.ops.rms_norm")
    monkeypatch.setattr(_registry, "pick", lambda *args: pytest.fail(f"asked the auto table: {args}"))
    x, weight = torch.randn(3, 16), torch.randn(16)
    y, _, rstd = module.RMS_NORM_FWD.launch("auto", x, weight, None, eps=1e-5, casting_mode="gemma")
    torch.testing.assert_close(y, sk.rms_norm_ref(x, weight, 1e-5, casting_mode="gemma"))
    module.RMS_NORM_BWD.launch("auto", torch.randn(3, 16), x, None, rstd, None)


@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_fakes_follow_the_records(residual):
    """torch.library.opcheck: the fakes (the records' allocators) agree with the real outputs."""
    x = torch.randn(2, 3, 16, requires_grad=True)
    weight = torch.randn(16, requires_grad=True)
    res = torch.randn(2, 3, 16, requires_grad=True) if residual else None
    torch.library.opcheck(torch.ops.solar_kernels.rms_norm_fwd, (x, weight, res, 1e-5, "triton"))
    _, h, rstd = torch.ops.solar_kernels.rms_norm_fwd(x.detach(), weight.detach(), res, 1e-5, "triton")
    args = (
        torch.randn(2, 3, 16),
        h.detach() if residual else x.detach(),
        weight.detach(),
        rstd,
        torch.randn(2, 3, 16) if residual else None,
        "triton",
    )
    torch.library.opcheck(torch.ops.solar_kernels.rms_norm_bwd, args)


def _logprobs_chunk():
    logits, labels = torch.randn(4, 30), torch.randint(0, 30, (4,))
    return logits, labels, torch.empty(4), torch.empty(4), torch.randn(4)


def test_in_place_record_hands_the_cuda_op_its_tensors_and_its_options_only(cuda_choice):
    """The log-prob row step declares no outputs: the CUDA op (logprobs_) gets the chunk's tensors,
    written in place, and the options its schema has (not the Triton launcher's RowOptions)."""
    module = importlib.import_module("solar_kernels.ops.linear_logprobs")
    chunk = _logprobs_chunk()
    module._logprobs_rows("auto", *chunk, -100, True, True)
    ((tensors, options),) = cuda_choice["logprobs"].calls
    assert [t.data_ptr() for t in tensors] == [t.data_ptr() for t in chunk]
    assert options == {"ignore_index": -100, "compute_lse": True, "write_grad": True}
    assert module.LOGPROBS.allocate(*chunk) == () and module.LOGPROBS.rows_width(*chunk) == (4, 30)


def test_a_launch_the_cuda_twin_lacks_runs_triton_on_auto_and_is_refused_by_name(cuda_choice):
    module = importlib.import_module("solar_kernels.ops.linear_logprobs")
    options = module.RowOptions(softcap=3.0)
    chunk = _logprobs_chunk()
    expected = [t.clone() for t in chunk]
    module._logprobs_rows("auto", *chunk, -100, True, False, options)
    assert cuda_choice["logprobs"].calls == []  # Triton ran it: the soft-capped log-probs
    module._logprobs_rows_torch(*expected, -100, True, False, options)
    torch.testing.assert_close(chunk[2:4], expected[2:4])
    with pytest.raises(
        ValueError, match="logprobs: the CUDA kernel does not implement this launch's options, got backend='cuda'"
    ):
        module._logprobs_rows("cuda", *chunk, -100, True, False, options)
    assert module.row_backend("auto", 4, 30, torch.device("cpu"), options) == "triton"
    assert module.row_backend("auto", 4, 30, torch.device("cpu"), module.RowOptions()) == "cuda"


def test_registering_a_name_twice_from_another_family_is_an_error():
    taken = swiglu_module.SWIGLU_FWD
    impostor = elementwise(taken.name, "not_swiglu", taken.triton, inputs=2, outputs=1)
    message = "'swiglu_fwd' is registered by swiglu already, got a second record from not_swiglu"
    with pytest.raises(ValueError, match=message):
        register(impostor)
    assert _registry.KERNELS["swiglu_fwd"] is taken


def test_a_record_needs_a_triton_launcher_and_examples():
    with pytest.raises(ValueError, match="'nothing' needs a Triton launcher and example inputs, got triton=None"):
        register(Kernel("nothing", "swiglu", example=swiglu_module.SWIGLU_FWD.example))
    with pytest.raises(ValueError, match="'nothing' needs a Triton launcher and example inputs, got .*example=None"):
        register(Kernel("nothing", "swiglu", triton=swiglu_module.SWIGLU_FWD.triton))
    assert "nothing" not in _registry.KERNELS


def test_no_kernel_is_left_off_the_registry():
    """The stop-gap for op files not moved (a record holding only a timing hook) is gone: every
    kernel, RMSNorm's included, is an out-variant record."""
    assert not hasattr(_registry, "register_unmoved") and not hasattr(_autotune, "register_kernel")
    assert {"rms_norm_fwd", "rms_norm_bwd"} <= set(_registry.KERNELS)
    assert all(k.out_variant for k in _registry.kernels())


def test_selfcheck_runs_every_registry_op():
    from solar_kernels import selfcheck

    rows, failed = selfcheck.check(torch.device("cpu"), ["fp32"], ["torch"])
    assert {op.name for op in _registry.ops()} <= {row[0] for row in rows}
    assert not failed, [row for row in rows if not row[-1]]


def test_benchmark_cases_of_registry_ops_count_bytes_from_the_contract():
    from benchmarks.cases import build_cases

    cases = {c.op: c for c in build_cases(torch.device("cpu"), [torch.float32], cpu=False, sweep=False, tokens=[8])}
    assert {op.name for op in _registry.ops()} <= set(cases)
    swiglu = cases["swiglu"]
    n = 8 * 14336 * 4  # 8 tokens of SOLAR's I in fp32
    assert swiglu.bytes == {"fwd": 3 * n, "bwd": 5 * n, "fwd+bwd": 8 * n}  # cases.py's table: 3·N·I·b, 5·N·I·b
    assert swiglu.grad_inputs == ("gate", "up") and swiglu.shape == {"tokens": 8, "intermediate": 14336}


def test_selfcheck_fails_a_nan_error_wherever_it_comes(monkeypatch):
    from solar_kernels import selfcheck

    errors = iter([0.0, float("nan")] * 1000)  # the output exact, a gradient NaN (max() would say 0.0)
    monkeypatch.setattr(selfcheck, "rel_err", lambda a, b: next(errors))
    rows, failed = selfcheck.check(torch.device("cpu"), ["fp32"], ["torch"])
    assert failed and not any(row[-1] for row in rows)
