"""SwiGLU activation: ``y = silu(gate) * up`` with ``silu(g) = g * sigmoid(g)``.

Backward (one pass, sigmoid recomputed rather than saved):

    dup   = dy * silu(gate)
    dgate = dy * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate)))

Shapes: gate and up [..., I] of the same shape (any leading dims, I of any size; row-strided views
such as the two halves of a fused gate/up projection are read in place). Dtypes: fp32, fp16, bf16,
gate and up alike; arithmetic in fp32, one rounding to the input dtype per output.

Under ``torch.autocast`` nothing is cast (autocast's lists hold neither ``silu`` nor the multiply):
gate and up come out of autocast's bf16 projections, so y and both gradients are bf16, as in
Hugging Face's ``LlamaMLP``; fp32 inputs stay fp32.

Backends: the Triton kernels below, or their CUDA C++ twins (csrc/swiglu.cu); the launchers switch
between them under one pair of custom ops.

``SwiGLU`` is the whole Llama MLP, ``down(swiglu(gate(x), up(x)))``, with Hugging Face's parameter
names (``gate_proj``, ``up_proj``, ``down_proj``) so ``LlamaMLP`` state dicts load into it.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._autotune import pick, register_kernel
from .._backend import resolve_backend
from .._checks import check_float_tensor, check_same_device_dtype, check_shape
from ._common import as_rows, cast_to, warps_for

OP = "swiglu"
# Elements per program: 4096 bf16 values of each input per program (8 KB), 16 per thread at 8 warps.
_BLOCK_ELEMENTS = 4096
_MAX_BLOCK_N = 2048


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch SwiGLU (what Hugging Face's ``LlamaMLP`` computes)."""
    return torch.nn.functional.silu(gate) * up


@triton.jit
def _swiglu_fwd_kernel(
    G, U, Y,
    stride_g_row, stride_u_row, stride_y_row,
    n_rows, n_cols,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    g = tl.load(G + rows[:, None] * stride_g_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + rows[:, None] * stride_y_row + cols[None, :], cast_to(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY, G, U, DG, DU,
    stride_dy_row, stride_g_row, stride_u_row, stride_dg_row, stride_du_row,
    n_rows, n_cols,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    dy = tl.load(DY + rows[:, None] * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows[:, None] * stride_g_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    du = dy * silu
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + rows[:, None] * stride_dg_row + cols[None, :], cast_to(dg, DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows[:, None] * stride_du_row + cols[None, :], cast_to(du, DU.dtype.element_ty), mask=mask)


def _blocks(n_rows: int, n_cols: int) -> Tuple[int, int, tuple]:
    block_n = min(triton.next_power_of_2(n_cols), _MAX_BLOCK_N)
    block_m = max(1, _BLOCK_ELEMENTS // block_n)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    return block_m, block_n, grid


def _swiglu_fwd(g2d, u2d, backend="triton"):
    """y [N, I] for rows gate, up [N, I]."""
    n_rows, n_cols = g2d.shape
    if pick(backend, "swiglu_fwd", n_rows, n_cols, g2d.device) == "cuda":
        return torch.ops.solar_kernels_C.swiglu_fwd(g2d, u2d)
    y = torch.empty((n_rows, n_cols), dtype=g2d.dtype, device=g2d.device)
    block_m, block_n, grid = _blocks(n_rows, n_cols)
    _swiglu_fwd_kernel[grid](
        g2d, u2d, y, g2d.stride(0), u2d.stride(0), y.stride(0), n_rows, n_cols,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps_for(block_m * block_n),
    )
    return y


def _swiglu_bwd(dy2d, g2d, u2d, backend="triton"):
    """(dgate, dup) [N, I] for rows dy, gate, up [N, I]."""
    n_rows, n_cols = g2d.shape
    if pick(backend, "swiglu_bwd", n_rows, n_cols, g2d.device) == "cuda":
        return torch.ops.solar_kernels_C.swiglu_bwd(dy2d, g2d, u2d)
    dg = torch.empty((n_rows, n_cols), dtype=g2d.dtype, device=g2d.device)
    du = torch.empty_like(dg)
    block_m, block_n, grid = _blocks(n_rows, n_cols)
    _swiglu_bwd_kernel[grid](
        dy2d, g2d, u2d, dg, du,
        dy2d.stride(0), g2d.stride(0), u2d.stride(0), dg.stride(0), du.stride(0),
        n_rows, n_cols,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps_for(block_m * block_n),
    )
    return dg, du


@torch.library.custom_op("solar_kernels::swiglu_fwd", mutates_args=())
def _swiglu_fwd_op(gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
    n_cols = gate.shape[-1]
    return _swiglu_fwd(as_rows(gate, n_cols), as_rows(up, n_cols), backend).view(gate.shape)


@_swiglu_fwd_op.register_fake
def _(gate, up, backend):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("solar_kernels::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, backend: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    n_cols = gate.shape[-1]
    dg, du = _swiglu_bwd(as_rows(dy, n_cols), as_rows(gate, n_cols), as_rows(up, n_cols), backend)
    return dg.view(gate.shape), du.view(gate.shape)


@_swiglu_bwd_op.register_fake
def _(dy, gate, up, backend):
    return (
        torch.empty_like(gate, memory_format=torch.contiguous_format),
        torch.empty_like(gate, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    gate, up, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.backend = backend


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup = _swiglu_bwd_op(dy, gate, up, ctx.backend)
    return dgate, dup, None


torch.library.register_autograd("solar_kernels::swiglu_fwd", _backward, setup_context=_setup_context)


def _time_fwd(backend, rows, width, device):
    gate, up = (torch.randn(rows, width, device=device, dtype=torch.bfloat16) for _ in range(2))
    return lambda: _swiglu_fwd(gate, up, backend)


def _time_bwd(backend, rows, width, device):
    dy, gate, up = (torch.randn(rows, width, device=device, dtype=torch.bfloat16) for _ in range(3))
    return lambda: _swiglu_bwd(dy, gate, up, backend)


register_kernel("swiglu_fwd", _time_fwd)
register_kernel("swiglu_bwd", _time_bwd)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """``silu(gate) * up`` for gate and up [..., I]; a new tensor in their dtype."""
    check_float_tensor(OP, "gate", gate)
    check_float_tensor(OP, "up", up)
    check_same_device_dtype(OP, "gate", gate, up=up)
    check_shape(OP, "up", up, tuple(gate.shape), "gate.shape")
    resolved = resolve_backend(OP, backend, gate.device)
    if resolved == "torch":
        return swiglu_ref(gate, up)
    return _swiglu_fwd_op(gate, up, resolved)


class SwiGLU(torch.nn.Module):
    """The Llama/Mistral MLP: ``down_proj(swiglu(gate_proj(x), up_proj(x)))``.

    Parameter names match Hugging Face's ``LlamaMLP``, so its state dict loads unchanged.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, *,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.gate_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.up_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.down_proj = torch.nn.Linear(intermediate_size, hidden_size, bias=bias, **factory)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), backend=self.backend))
