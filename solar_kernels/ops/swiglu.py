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

Backends: the Triton kernels below, or their CUDA C++ twins (csrc/swiglu.cu), under one pair of
custom ops. Both are out-variant launchers of the two records ``SWIGLU_FWD`` and ``SWIGLU_BWD``
(solar_kernels/ops/_registry.py), which allocate the outputs, pick the implementation and hold the
output contract the fakes use.

``SwiGLU`` is the whole Llama MLP, ``down(swiglu(gate(x), up(x)))``, with Hugging Face's parameter
names (``gate_proj``, ``up_proj``, ``down_proj``) so ``LlamaMLP`` state dicts load into it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import resolve_backend
from .._checks import check_float_tensor, check_same_device_dtype, check_shape
from ._common import as_rows, cast_to, warps_for
from ._registry import Op, custom_op, elementwise, register, register_op

OP = "swiglu"
# Elements per program: 4096 bf16 values of each input per program (8 KB), 16 per thread at 8 warps.
_BLOCK_ELEMENTS = 4096
_MAX_BLOCK_N = 2048


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch SwiGLU (what Hugging Face's ``LlamaMLP`` computes)."""
    return torch.nn.functional.silu(gate) * up


@triton.jit
def _row_tile(n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's [BLOCK_M, BLOCK_N] tile: its row indices (int64, so row * stride cannot
    overflow) as a column, its column indices as a row, and the mask of those inside the rows."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    return rows, cols, (rows < n_rows) & (cols < n_cols)


@triton.jit
def _load(PTR, rows, cols, stride_row, mask):
    """A tile of PTR's rows in fp32 (0 where masked)."""
    return tl.load(PTR + rows * stride_row + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store(PTR, rows, cols, stride_row, mask, value):
    """value (fp32) into a tile of PTR's rows, rounded once to PTR's dtype."""
    tl.store(PTR + rows * stride_row + cols, cast_to(value, PTR.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_fwd_kernel(
    G, U, Y, stride_g_row, stride_u_row, stride_y_row, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    rows, cols, mask = _row_tile(n_rows, n_cols, BLOCK_M, BLOCK_N)
    g = _load(G, rows, cols, stride_g_row, mask)
    _store(Y, rows, cols, stride_y_row, mask, g * tl.sigmoid(g) * _load(U, rows, cols, stride_u_row, mask))


@triton.jit
def _swiglu_bwd_kernel(
    DY,
    G,
    U,
    DG,
    DU,
    stride_dy_row,
    stride_g_row,
    stride_u_row,
    stride_dg_row,
    stride_du_row,
    n_rows,
    n_cols,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows, cols, mask = _row_tile(n_rows, n_cols, BLOCK_M, BLOCK_N)
    dy = _load(DY, rows, cols, stride_dy_row, mask)
    g = _load(G, rows, cols, stride_g_row, mask)
    u = _load(U, rows, cols, stride_u_row, mask)
    sig = tl.sigmoid(g)
    du = dy * (g * sig)  # dy * silu(g)
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    _store(DG, rows, cols, stride_dg_row, mask, dg)
    _store(DU, rows, cols, stride_du_row, mask, du)


def _blocks(n_rows: int, n_cols: int) -> tuple[int, int, tuple]:
    block_n = min(triton.next_power_of_2(n_cols), _MAX_BLOCK_N)
    block_m = max(1, _BLOCK_ELEMENTS // block_n)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    return block_m, block_n, grid


def _launch_rows(kernel, *tensors):
    """``kernel`` over [N, I] ``tensors`` of one shape, which it takes in this order followed by
    their row strides, then (n_rows, n_cols) and the block sizes of ``_blocks``."""
    n_rows, n_cols = tensors[0].shape
    block_m, block_n, grid = _blocks(n_rows, n_cols)
    kernel[grid](
        *tensors,
        *(t.stride(0) for t in tensors),
        n_rows,
        n_cols,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=warps_for(block_m * block_n),
    )


def _swiglu_fwd_triton(gate, up, y):
    """y = silu(gate) * up, written into y; all [N, I] rows."""
    _launch_rows(_swiglu_fwd_kernel, gate, up, y)


def _swiglu_bwd_triton(dy, gate, up, dgate, dup):
    """dgate and dup, written into them; all [N, I] rows."""
    _launch_rows(_swiglu_bwd_kernel, dy, gate, up, dgate, dup)


# (gate, up) -> y and (dy, gate, up) -> (dgate, dup), each like gate; CUDA ops in csrc/swiglu.cu.
SWIGLU_FWD = register(elementwise("swiglu_fwd", "swiglu", _swiglu_fwd_triton, inputs=2, outputs=1))
SWIGLU_BWD = register(elementwise("swiglu_bwd", "swiglu", _swiglu_bwd_triton, inputs=3, outputs=2))


@custom_op("swiglu_fwd", fake=lambda gate, up, backend: SWIGLU_FWD.allocate(gate, up)[0])
def _swiglu_fwd_op(gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
    n_cols = gate.shape[-1]
    (y,) = SWIGLU_FWD.launch(backend, as_rows(gate, n_cols), as_rows(up, n_cols))
    return y.view(gate.shape)


@custom_op("swiglu_bwd", fake=lambda dy, gate, up, backend: SWIGLU_BWD.allocate(dy, gate, up))
def _swiglu_bwd_op(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    n_cols = gate.shape[-1]
    dg, du = SWIGLU_BWD.launch(backend, as_rows(dy, n_cols), as_rows(gate, n_cols), as_rows(up, n_cols))
    return dg.view(gate.shape), du.view(gate.shape)


def _setup_context(ctx, inputs, output):
    gate, up, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.backend = backend


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup = _swiglu_bwd_op(dy, gate, up, ctx.backend)
    return dgate, dup, None


torch.library.register_autograd("solar_kernels::swiglu_fwd", _backward, setup_context=_setup_context)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
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

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        bias: bool = False,
        *,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.gate_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.up_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.down_proj = torch.nn.Linear(intermediate_size, hidden_size, bias=bias, **factory)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), backend=self.backend))


register_op(Op("swiglu", swiglu, swiglu_ref, (SWIGLU_FWD, SWIGLU_BWD), width="intermediate_size"))
