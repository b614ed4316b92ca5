"""RMSNorm with an optional fused residual add (Hugging Face ``LlamaRMSNorm`` semantics by default;
Liger-Kernel's ``offset`` and casting modes, and no weight, as options).

Math, for a row x of width d (all reductions in fp32):

    rstd = rsqrt(mean(x.float() ** 2) + eps)
    y    = weight * (x.float() * rstd).to(x.dtype)

Options, as Liger-Kernel 0.8.5's ``LigerRMSNormFunction`` (tests/fixtures/liger holds its outputs):

- ``offset``: y scales by ``offset + weight`` (Gemma: 1.0, its weights are stored as w for 1 + w).
- ``casting_mode`` says where values are rounded to x's dtype (they differ by an ulp here and there):
  ``"llama"`` (default) only rstd in fp32: ``y = ((x.float() * rstd).to(x.dtype) * (offset +
  weight.float())).to(x.dtype)``, as ``LlamaRMSNorm`` (and Qwen, Mistral) and Liger's llama mode,
  which adds the offset in fp32; ``"gemma"`` everything in fp32, one rounding at the end, as
  Gemma's RMSNorm: ``(x.float() * rstd * (offset + weight.float())).to(x.dtype)``; ``"none"``
  every op in x's dtype as eager code on such tensors runs it (``h.pow(2)``, its mean accumulated in
  fp32, ``+ eps``, ``rsqrt``, ``* rstd``, ``* (weight + offset)``, each rounded), cheaper and less
  accurate. The backward is the same in every mode: dy and x read in fp32 with the forward's rstd
  (as Liger's), and g = dy * (offset + weight) below.
- ``weight=None``: no affine, y is the normalized row (rounded per mode); ``offset`` then is refused
  (Liger ignores it silently).

Fused residual variant (the pre-norm block's ``h = x + residual; y = norm(h)``): returns ``(y, h)``
with ``h`` rounded to x's dtype before it is normalized, as in the unfused model.

Backward, with n = x * rstd and g = dy * weight:

    dx = rstd * (g - n * mean(g * n))        (+ dh for the residual variant; x and residual share it)
    dweight = sum over rows of dy * n

Shapes: x [..., d] (any leading dims), weight [d], residual like x. Rows are read through their
stride (row-strided views are not copied); d of any size: rows up to ``_MAX_TILE`` wide are held in
registers (one read of x per pass), wider rows loop over column tiles.

Dtypes: x, residual and weight in fp32, fp16 or bf16 (weight may differ from x); y and h come out in
x's dtype (Hugging Face promotes y to weight's dtype when they differ; we keep x's, except under
autocast, below); dweight in weight's dtype, reduced in fp32 from per-program partial sums without
atomics.

Under ``torch.autocast`` (whose casting lists hold none of RMSNorm's ops) it does what Hugging
Face's ``LlamaRMSNorm`` does there: fp32 math, nothing cast. With autocast's fp32 residual stream and
fp32 weight, y is fp32. Where dtypes differ, eager type promotion decides, as in the eager code:
``x + residual`` of a bf16 x and an fp32 residual is fp32 (x is widened first, exactly), and a bf16 x
with an fp32 weight gives ``weight * normed.to(bf16)``, an fp32 y (outside autocast y keeps x's
dtype). Gradients come back in each input's dtype. The CUDA twin writes y in x's dtype only, so that
one promoted case (y wider than x) runs the Triton kernels on every backend. That is the llama mode;
the gemma and none modes write y in h's dtype under autocast too (as Gemma's RMSNorm, whose
``type_as(x)`` undoes the promotion, and Liger, whose y is always x's dtype), gemma computing in
fp32 inside regardless; h still follows eager promotion (an fp32 residual stream makes h fp32).

Backends: the Triton kernels below, or their CUDA C++ twins (csrc/rms_norm.cu, same math and
roundings), under one pair of custom ops and one autograd formula. Both are out-variant launchers
of the records ``RMS_NORM_FWD`` and ``RMS_NORM_BWD`` (solar_kernels/ops/_registry.py), which
allocate the outputs, pick the implementation and hold what the fakes allocate. The CUDA twins
implement the llama mode with a weight and no offset: for any other option ``backend="auto"`` (or
None) runs Triton (or torch where Triton does not run), and naming ``"cuda"`` is refused in one
line naming the option.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _checks
from .._backend import BACKENDS, TRITON_INTERPRETED, resolve_backend
from ._autocast import autocast_on
from ._common import as_rows, cast_to, persistent_programs, warps_for
from ._registry import Kernel, Op, custom_op, register, register_op, rows_width

OP = "rms_norm"
CASTING_MODES = ("llama", "gemma", "none")
# The kernels' MODE constexpr for each casting mode.
_MODE_CODES = {"llama": 0, "gemma": 1, "none": 2}
# Widest row held in registers by one program; 8192 fp32 values spread over 16 warps is 16 per thread.
_MAX_TILE = 8192
# Elements one forward program handles: narrow rows are grouped so each program moves >= 8 KB.
_FWD_ELEMENTS = 4096
# Backward at d = 4096: 16 warps hold 8 fp32 values of a row per thread (64 registers), so 2 programs of
# 512 threads fit an SM; each keeps up to 4 row blocks of loads in flight (NUM_STAGES - 1, copied
# ahead into shared memory), at most _BWD_PREFETCH_BYTES of them, so two programs' buffers fit an
# A100's 164 KB of shared memory as well as an H100's 228 KB.
_BWD_PROGRAMS_PER_SM = 2
_BWD_ELEMENTS_PER_THREAD = 8
_BWD_MAX_PREFETCH = 4
_BWD_PREFETCH_BYTES = 72 * 1024
# Column sum of the backward's per-program dweight partials: BLOCK_N columns x BLOCK_R partial rows
# per step (32 fp32 columns = one 128-byte line per row, d / 32 programs).
_SUM_BLOCK_N = 32
_SUM_BLOCK_R = 64


def rms_norm_ref(
    x, weight, eps=1e-6, residual=None, *, offset=0.0, casting_mode="llama"
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``rms_norm`` (its arguments, ``residual`` also positional) in plain PyTorch: the semantics
    every backend matches, per casting mode (module docstring). Under autocast the llama mode keeps
    Hugging Face's ``weight * normed`` type promotion; otherwise, and in the other modes, y is in
    h's dtype."""
    h = x + residual if residual is not None else x
    if casting_mode == "none":
        # Every op in h's dtype (weight + offset in weight's), as eager code on bf16 tensors runs.
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        y = (normed * (weight + offset) if weight is not None else normed).to(h.dtype)
        return (y, h) if residual is not None else y
    h32 = h.float()
    normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    if casting_mode == "llama":
        normed = normed.to(h.dtype)  # Llama rounds the normalized row before the weight multiply
    if weight is None:
        y = normed.to(h.dtype)
    else:
        # (offset + weight) in fp32, the product in fp32 (exact for offset 0: bf16 x bf16 fits).
        y = normed.float() * (weight.float() + offset)
        y_dtype = h.dtype
        if casting_mode == "llama" and autocast_on(h.device):
            y_dtype = torch.promote_types(h.dtype, weight.dtype)
        y = y.to(y_dtype)
    return (y, h) if residual is not None else y


@triton.jit
def _load_sum(x_rows, res_rows, h_rows, cols, mask, HAS_RESIDUAL: tl.constexpr):
    """A [rows, cols] tile of x in fp32; with a residual, h = x + residual is stored (rounded to
    h's dtype, as the unfused model would hold it) and returned instead."""
    x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(res_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = cast_to(x, h_rows.dtype.element_ty)
        tl.store(h_rows + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)
    return x


@triton.jit
def _squares(x, X_DTYPE: tl.constexpr, MODE: tl.constexpr):
    """x * x for the sum of squares; rounded to x's dtype in the none mode (eager ``h.pow(2)``)."""
    if MODE == 2:
        return cast_to(x * x, X_DTYPE).to(tl.float32)
    return x * x


@triton.jit
def _rstd(sum_sq, n_cols, eps, X_DTYPE: tl.constexpr, MODE: tl.constexpr):
    """rsqrt(mean + eps) in fp32; in the none mode each step rounded to x's dtype, as eager
    ``torch.rsqrt(h.pow(2).mean(-1) + eps)`` on x's dtype (its mean accumulates in fp32)."""
    if MODE == 2:
        mean = cast_to(sum_sq / n_cols, X_DTYPE).to(tl.float32)
        return cast_to(tl.rsqrt(cast_to(mean + eps, X_DTYPE).to(tl.float32)), X_DTYPE).to(tl.float32)
    return tl.rsqrt(sum_sq / n_cols + eps)


@triton.jit
def _store_normed(
    x,
    rstd,
    W,
    y_rows,
    cols,
    mask,
    n_cols,
    offset,
    NORMED_DTYPE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    MODE: tl.constexpr,
):
    """y = (offset + weight) * normed for one tile, rounded to y's dtype (x's, or wider under
    autocast). llama: normed = (x * rstd).to(x dtype), the product in fp32, as Hugging Face rounds
    it; gemma: all fp32; none: each op rounded to its eager dtype (offset + weight in weight's)."""
    normed = x * rstd[:, None]
    if MODE != 1:
        normed = cast_to(normed, NORMED_DTYPE).to(tl.float32)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32) + offset
        if MODE == 2:
            w = cast_to(w, W.dtype.element_ty).to(tl.float32)
        normed = normed * w[None, :]
    tl.store(y_rows + cols[None, :], cast_to(normed, y_rows.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_fwd_kernel(
    X,
    RES,
    W,
    Y,
    H,
    RSTD,
    stride_x_row,
    stride_res_row,
    stride_y_row,
    stride_h_row,
    n_rows,
    n_cols,
    eps,
    offset,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    rows = rows.to(tl.int64)
    x_rows = X + rows[:, None] * stride_x_row
    res_rows = RES + rows[:, None] * stride_res_row
    y_rows = Y + rows[:, None] * stride_y_row
    h_rows = H + rows[:, None] * stride_h_row
    if SINGLE_TILE:
        cols = tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols[None, :] < n_cols)
        x = _load_sum(x_rows, res_rows, h_rows, cols, mask, HAS_RESIDUAL)
        rstd = _rstd(tl.sum(_squares(x, X.dtype.element_ty, MODE), axis=1), n_cols, eps, X.dtype.element_ty, MODE)
        _store_normed(x, rstd, W, y_rows, cols, mask, n_cols, offset, X.dtype.element_ty, HAS_WEIGHT, MODE)
    else:
        # Pass 1: sum of squares over column tiles (writing h on the way); pass 2: normalize.
        sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (cols[None, :] < n_cols)
            x = _load_sum(x_rows, res_rows, h_rows, cols, mask, HAS_RESIDUAL)
            sum_sq += tl.sum(_squares(x, X.dtype.element_ty, MODE), axis=1)
        rstd = _rstd(sum_sq, n_cols, eps, X.dtype.element_ty, MODE)
        for start in range(0, n_cols, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (cols[None, :] < n_cols)
            if HAS_RESIDUAL:
                x = tl.load(h_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            _store_normed(x, rstd, W, y_rows, cols, mask, n_cols, offset, X.dtype.element_ty, HAS_WEIGHT, MODE)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,
    X,
    W,
    RSTD,
    DH,
    DX,
    DW_PARTIAL,
    stride_dy_row,
    stride_x_row,
    stride_dh_row,
    stride_dx_row,
    n_rows,
    n_cols,
    rows_per_program,
    offset,
    HAS_DH: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # Each program owns a contiguous range of rows and one row of DW_PARTIAL ([programs, d], fp32).
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 so row * stride cannot overflow
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    partial = DW_PARTIAL + pid.to(tl.int64) * n_cols
    if SINGLE_TILE:
        cols = tl.arange(0, BLOCK_D)
        col_mask = cols < n_cols
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
        # dw is folded over the block's rows every step: one [BLOCK_D] accumulator, not [BLOCK_M, BLOCK_D].
        # The row loop is software-pipelined: the next blocks' dy and x are copied in (cp.async) while
        # this one is computed, so a program keeps NUM_STAGES - 1 blocks of loads in flight.
        dw = tl.zeros([BLOCK_D], dtype=tl.float32)
        for block_start in tl.range(row_start, row_end, BLOCK_M, num_stages=NUM_STAGES):
            rows = block_start + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            mask = row_mask[:, None] & col_mask[None, :]
            dy = tl.load(DY + rows[:, None] * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            normed = x * rstd[:, None]
            if HAS_WEIGHT:
                g = dy * w[None, :]
            else:
                g = dy
            mean_gn = tl.sum(g * normed, axis=1) / n_cols
            dx = rstd[:, None] * (g - normed * mean_gn[:, None])
            if HAS_DH:
                dx += tl.load(DH + rows[:, None] * stride_dh_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + rows[:, None] * stride_dx_row + cols[None, :], cast_to(dx, DX.dtype.element_ty), mask=mask)
            if HAS_WEIGHT:
                dw += tl.sum(dy * normed, axis=0)
        if HAS_WEIGHT:
            tl.store(partial + cols, dw, mask=col_mask)
    else:
        # Rows too wide for registers: one row at a time, two passes over column tiles; the
        # program's DW_PARTIAL row (zero-initialized, owned by this program alone) accumulates dw.
        for row in range(row_start, row_end):
            rstd = tl.load(RSTD + row)
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK_D):
                cols = start + tl.arange(0, BLOCK_D)
                col_mask = cols < n_cols
                dy = tl.load(DY + row * stride_dy_row + cols, mask=col_mask, other=0.0).to(tl.float32)
                x = tl.load(X + row * stride_x_row + cols, mask=col_mask, other=0.0).to(tl.float32)
                if HAS_WEIGHT:
                    dy = dy * (tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + offset)
                acc += dy * x * rstd
            mean_gn = tl.sum(acc, axis=0) / n_cols
            for start in range(0, n_cols, BLOCK_D):
                cols = start + tl.arange(0, BLOCK_D)
                col_mask = cols < n_cols
                dy = tl.load(DY + row * stride_dy_row + cols, mask=col_mask, other=0.0).to(tl.float32)
                x = tl.load(X + row * stride_x_row + cols, mask=col_mask, other=0.0).to(tl.float32)
                normed = x * rstd
                g = dy
                if HAS_WEIGHT:
                    g = dy * (tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + offset)
                dx = rstd * (g - normed * mean_gn)
                if HAS_DH:
                    dx += tl.load(DH + row * stride_dh_row + cols, mask=col_mask, other=0.0).to(tl.float32)
                tl.store(DX + row * stride_dx_row + cols, cast_to(dx, DX.dtype.element_ty), mask=col_mask)
                if HAS_WEIGHT:
                    dw_row = tl.load(partial + cols, mask=col_mask, other=0.0)
                    tl.store(partial + cols, dw_row + dy * normed, mask=col_mask)


@triton.jit
def _column_sum_kernel(PARTIAL, OUT, n_partials, n_cols, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT[c] = sum over rows of PARTIAL[:, c] ([n_partials, n_cols] fp32, contiguous), summed in fp32
    and rounded once to OUT's dtype (dweight in weight's dtype: one kernel, no fp32 intermediate)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, n_partials, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows[:, None] < n_partials) & col_mask[None, :]
        tile = tl.load(PARTIAL + rows[:, None].to(tl.int64) * n_cols + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(tile, axis=0)
    tl.store(OUT + cols, cast_to(acc, OUT.dtype.element_ty), mask=col_mask)


def _column_sum(partial: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Column sums of ``partial`` [programs, d] (fp32) written into ``out`` [d] (its dtype), in one launch."""
    n_partials, n_cols = partial.shape
    # Under the interpreter each program is Python: a few wide programs instead of d / 32 narrow ones.
    block_n = triton.next_power_of_2(triton.cdiv(n_cols, 4)) if TRITON_INTERPRETED else _SUM_BLOCK_N
    block_r = triton.next_power_of_2(n_partials) if TRITON_INTERPRETED else _SUM_BLOCK_R
    _column_sum_kernel[(triton.cdiv(n_cols, block_n),)](
        partial,
        out,
        n_partials,
        n_cols,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        num_warps=4,
    )
    return out


def _bwd_stages(block_elements: int, *inputs: torch.Tensor) -> int:
    """Software-pipeline depth of the backward's row loop: 1 + the row blocks loaded ahead (their dy,
    x and dh), up to _BWD_MAX_PREFETCH blocks within _BWD_PREFETCH_BYTES."""
    block_bytes = block_elements * sum(t.element_size() for t in inputs)
    return 1 + max(1, min(_BWD_MAX_PREFETCH, _BWD_PREFETCH_BYTES // block_bytes))


def _tile(n_cols: int) -> tuple[int, bool]:
    block_d = triton.next_power_of_2(n_cols)
    if block_d <= _MAX_TILE:
        return block_d, True
    return _MAX_TILE, False


def _rms_norm_fwd_triton(x, weight, residual, y, h, rstd, eps, offset=0.0, casting_mode="llama") -> None:
    """y, h = x + residual (with a residual; h is None without) and rstd of rows x [N, d], written
    into them; y in its own dtype (x's, or wider under autocast)."""
    n_rows, n_cols = x.shape
    block_d, single_tile = _tile(n_cols)
    block_m = max(1, min(64, _FWD_ELEMENTS // block_d)) if single_tile else 1
    res = residual if residual is not None else x
    h = h if h is not None else y  # not written without a residual
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
        x,
        res,
        weight if weight is not None else x,
        y,
        h,
        rstd,
        x.stride(0),
        res.stride(0),
        y.stride(0),
        h.stride(0),
        n_rows,
        n_cols,
        eps,
        offset,
        HAS_RESIDUAL=residual is not None,
        HAS_WEIGHT=weight is not None,
        MODE=_MODE_CODES[casting_mode],
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        SINGLE_TILE=single_tile,
        num_warps=warps_for(block_m * block_d),
    )


def _rms_norm_bwd_triton(dy, h, weight, rstd, dh, dx, dweight, offset=0.0) -> None:
    """dx (+ dh, the residual variant's gradient of h, when given) and dweight (None without a weight)
    for rows [N, d], written into them. The same for every casting mode (the modes' backwards differ
    only in roundings of fp32 values: dy and x are read in fp32, rstd is the forward's)."""
    n_rows, n_cols = h.shape
    block_d, single_tile = _tile(n_cols)
    block_m = max(1, min(16, _FWD_ELEMENTS // block_d)) if single_tile else 1
    programs = persistent_programs(h.device, triton.cdiv(n_rows, block_m), per_sm=_BWD_PROGRAMS_PER_SM)
    rows_per_program = triton.cdiv(n_rows, programs)
    alloc = torch.empty if single_tile else torch.zeros
    has_weight = weight is not None
    dw_partial = alloc((programs, n_cols) if has_weight else (1,), dtype=torch.float32, device=h.device)
    dh_rows = dh if dh is not None else dy
    _rms_norm_bwd_kernel[(programs,)](
        dy,
        h,
        weight if has_weight else h,
        rstd,
        dh_rows,
        dx,
        dw_partial,
        dy.stride(0),
        h.stride(0),
        dh_rows.stride(0),
        dx.stride(0),
        n_rows,
        n_cols,
        rows_per_program,
        offset,
        HAS_DH=dh is not None,
        HAS_WEIGHT=has_weight,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        SINGLE_TILE=single_tile,
        NUM_STAGES=_bwd_stages(block_m * block_d, dy, h, *([dh] if dh is not None else [])),
        num_warps=warps_for(block_m * block_d, _BWD_ELEMENTS_PER_THREAD),
    )
    if has_weight:
        _column_sum(dw_partial, dweight)


def _y_dtype(x: torch.Tensor, weight: torch.Tensor | None, promote: bool) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype) if promote and weight is not None else x.dtype


def _fwd_outputs(x, weight, residual, *, promote=False):
    """y [..., d] (x's dtype; with ``promote``, autocast's, the promotion of x's and weight's), h like x
    (None without a residual) and rstd [rows] fp32."""
    y = torch.empty(x.shape, dtype=_y_dtype(x, weight, promote), device=x.device)
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    return y, h, torch.empty(rows_width(x)[0], dtype=torch.float32, device=x.device)


def _bwd_outputs(dy, h, weight, rstd, dh):
    """dx like h and dweight like weight (None without a weight)."""
    dweight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if weight is not None else None
    return torch.empty(h.shape, dtype=h.dtype, device=h.device), dweight


def _fwd_example(rows: int, width: int, dtype: torch.dtype, device, make=torch.randn):
    return make(rows, width, dtype=dtype, device=device), make(width, dtype=dtype, device=device), None


def _bwd_example(rows: int, width: int, dtype: torch.dtype, device, make=torch.randn):
    dy, h = (make(rows, width, dtype=dtype, device=device) for _ in range(2))
    rstd = make(rows, dtype=torch.float32, device=device)
    return dy, h, make(width, dtype=dtype, device=device), rstd, None


def _compile_launches(backward: bool):
    """The launches the compile tool compiles for one record: SOLAR's rows (``rows`` x ``width``) and
    rows too wide for registers (64 x 65536, the two-pass loop), each with and without a residual,
    and in bf16 autocast's dtypes (bf16 x, fp32 weight: an fp32 y, so an fp32 dy)."""
    kind = "bwd" if backward else "fwd"

    def launches(rows: int, width: int, dtype: torch.dtype, make) -> list[tuple[str, bool, tuple, dict]]:
        found = []
        for n, d, solar in ((rows, width, True), (64, 65536, False)):
            x, w, rstd = make(n, d, dtype=dtype), make(d, dtype=dtype), make(n, dtype=torch.float32)
            for residual in (None, make(n, d, dtype=dtype)):
                label = f"rms_norm{'+residual' if residual is not None else ''} {kind} d={d}"
                found.append(
                    (
                        label,
                        solar,
                        (x, x, w, rstd, residual) if backward else (x, w, residual),
                        {} if backward else {"eps": 1e-5},
                    )
                )
        if dtype == torch.bfloat16:
            x, w32 = make(rows, width, dtype=dtype), make(width, dtype=torch.float32)
            rstd = make(rows, dtype=torch.float32)
            if backward:
                found.append(
                    (
                        f"rms_norm bwd d={width} fp32 dy, fp32 weight",
                        True,
                        (make(rows, width, dtype=torch.float32), x, w32, rstd, None),
                        {},
                    )
                )
            else:
                found.append(
                    (
                        f"rms_norm fwd d={width} fp32 weight -> fp32 y",
                        True,
                        (x, w32, None),
                        {"eps": 1e-5, "promote": True},
                    )
                )
        return found

    return launches


def _non_default_option(weight, offset=0.0, casting_mode="llama") -> str:
    """The first option of this call that the CUDA twin does not implement, or "" when none."""
    if casting_mode != "llama":
        return f"casting_mode={casting_mode!r}"
    if offset != 0:
        return f"offset={offset!r}"
    if weight is None:
        return "weight=None"
    return ""


# (x, weight, residual) -> (y, h, rstd) and (dy, h, weight, rstd, dh) -> (dx, dweight), over rows
# [N, d]; the CUDA ops (csrc/rms_norm.cu, rms_norm_host.cpp) implement the llama mode with a weight
# and no offset, y in x's dtype (dy in h's), and take eps only.
RMS_NORM_FWD = register(
    Kernel(
        "rms_norm_fwd",
        "rms_norm",
        triton=_rms_norm_fwd_triton,
        rows_width=lambda x, *rest: rows_width(x),
        example=_fwd_example,
        allocator=_fwd_outputs,
        allocate_options=("promote",),
        variants=({"eps": 1e-5},),
        cuda_options=("eps",),
        cuda_lacks=lambda x, weight, residual, offset=0.0, casting_mode="llama", **_: _non_default_option(
            weight, offset, casting_mode
        ),
        cuda_takes=lambda x, weight, residual, y, h, rstd: y.dtype == x.dtype,
        compile_launches=_compile_launches(backward=False),
    )
)
RMS_NORM_BWD = register(
    Kernel(
        "rms_norm_bwd",
        "rms_norm",
        triton=_rms_norm_bwd_triton,
        rows_width=lambda dy, h, *rest: rows_width(h),
        example=_bwd_example,
        allocator=_bwd_outputs,
        cuda_options=(),
        cuda_lacks=lambda dy, h, weight, rstd, dh, offset=0.0: _non_default_option(weight, offset),
        cuda_takes=lambda dy, h, weight, rstd, dh, dx, dweight: dy.dtype == h.dtype,
        compile_launches=_compile_launches(backward=True),
    )
)


def _rms_norm_fwd_fake(x, weight, residual, eps, backend, promote=False, offset=0.0, casting_mode="llama"):
    y, h, rstd = RMS_NORM_FWD.allocate(x, weight, residual, promote=promote)
    return y, (h if h is not None else x.new_empty(0)), rstd


@custom_op("rms_norm_fwd", fake=_rms_norm_fwd_fake)
def _rms_norm_fwd_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    backend: str,
    promote: bool = False,
    offset: float = 0.0,
    casting_mode: str = "llama",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, h, rstd) shaped like x, x, [rows]; h is empty without residual. ``backend`` is
    "triton", "cuda" or "auto" (decided per launch, forward and backward apart). ``promote``: y in
    the promotion of x's and weight's dtypes (autocast), else in x's."""
    n_cols = x.shape[-1]
    y, h, rstd = RMS_NORM_FWD.launch(
        backend,
        as_rows(x, n_cols),
        weight,
        as_rows(residual, n_cols) if residual is not None else None,
        eps=eps,
        offset=offset,
        casting_mode=casting_mode,
        promote=promote,
    )
    return y.view(x.shape), (h.view(x.shape) if h is not None else x.new_empty(0)), rstd


def _rms_norm_bwd_fake(dy, h, weight, rstd, dh, backend, offset=0.0):
    dx, dw = RMS_NORM_BWD.allocate(dy, h, weight, rstd, dh)
    return dx, (dw if dw is not None else h.new_empty(0))


@custom_op("rms_norm_bwd", fake=_rms_norm_bwd_fake)
def _rms_norm_bwd_op(
    dy: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    dh: torch.Tensor | None,
    backend: str,
    offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight); dweight is empty without a weight (a custom op returns tensors only)."""
    n_cols = h.shape[-1]
    dx, dw = RMS_NORM_BWD.launch(
        backend,
        as_rows(dy, n_cols),
        as_rows(h, n_cols),
        weight,
        rstd,
        as_rows(dh, n_cols) if dh is not None else None,
        offset=offset,
    )
    return dx.view(h.shape), (dw if dw is not None else h.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, residual, eps, backend, _promote, offset = inputs[:7]
    y, h, rstd = output
    ctx.has_residual = residual is not None
    ctx.has_weight = weight is not None
    ctx.backend, ctx.offset = backend, offset
    # Backward needs the normalized input: x itself, or h when the residual was fused in.
    ctx.save_for_backward(h if ctx.has_residual else x, weight, rstd)
    ctx.mark_non_differentiable(rstd)


def _backward(ctx, dy, dh, _drstd):
    normalized_input, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_bwd_op(
        dy,
        normalized_input,
        weight,
        rstd,
        dh if ctx.has_residual else None,
        ctx.backend,
        ctx.offset,
    )
    return dx, (dw if ctx.has_weight else None), (dx if ctx.has_residual else None), None, None, None, None, None


torch.library.register_autograd("solar_kernels::rms_norm_fwd", _backward, setup_context=_setup_context)


def _check_args(x, weight, residual, eps, offset, casting_mode):
    _checks.check_float_tensor(OP, "x", x)
    if weight is not None:
        _checks.check_float_tensor(OP, "weight", weight, ndims=(1,))
        if weight.shape[0] != x.shape[-1]:
            raise ValueError(f"{OP}: weight has {weight.shape[0]} elements, expected {x.shape[-1]} (x.shape[-1])")
        _checks.check_same_device(OP, "x", x, weight=weight)
    if residual is not None:
        _checks.check_float_tensor(OP, "residual", residual)
        _checks.check_same_device_dtype(OP, "x", x, residual=residual)
        _checks.check_shape(OP, "residual", residual, tuple(x.shape), "x.shape")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"{OP}: eps must be a non-negative float, got {eps!r}")
    if casting_mode not in CASTING_MODES:
        raise ValueError(
            f"{OP}: casting_mode must be one of {', '.join(map(repr, CASTING_MODES))}, got {casting_mode!r}"
        )
    if not _checks.is_finite_number(offset):
        raise ValueError(f"{OP}: offset must be a finite float, got {offset!r}")
    if weight is None and offset != 0:
        # Liger ignores offset without a weight; y = normed * (offset + weight) needs one.
        raise ValueError(f"{OP}: offset={offset!r} scales by (offset + weight) and needs a weight, got weight=None")


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    residual: torch.Tensor | None = None,
    offset: float = 0.0,
    casting_mode: str = "llama",
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``x`` [..., d] with ``weight`` [d] (None: no affine); with ``residual``, returns
    ``(y, x + residual)``. ``offset`` scales by ``offset + weight`` (Gemma: 1.0); ``casting_mode``
    is ``"llama"``, ``"gemma"`` or ``"none"``, as Liger-Kernel's (module docstring).

    Out of place: neither x nor residual is written. See the module docstring for math and dtypes,
    and for what autocast changes.
    """
    promote = isinstance(x, torch.Tensor) and autocast_on(x.device)
    if promote:
        x, residual = _promote_residual(x, residual)
    _check_args(x, weight, residual, eps, offset, casting_mode)
    option = _non_default_option(weight, offset, casting_mode)
    implemented = ("torch", "triton") if option else BACKENDS
    resolved = resolve_backend(OP, backend, x.device, implemented=implemented, option=option)
    if resolved == "torch":
        return rms_norm_ref(x, weight, eps, residual, offset=offset, casting_mode=casting_mode)
    # Only the llama mode promotes y under autocast (Gemma's and Liger's modules return x's dtype).
    promote = promote and casting_mode == "llama"
    y, h, _ = _rms_norm_fwd_op(x, weight, residual, float(eps), resolved, promote, float(offset), casting_mode)
    return (y, h) if residual is not None else y


def _promote_residual(x, residual):
    """x and residual in one dtype, the one eager ``x + residual`` computes in (under autocast, a
    bf16 branch output meets the fp32 residual stream); the cast is recorded by autograd."""
    if not isinstance(residual, torch.Tensor) or residual.dtype == x.dtype:
        return x, residual
    if x.dtype not in _checks.FLOAT_DTYPES or residual.dtype not in _checks.FLOAT_DTYPES:
        return x, residual  # for the argument checks to reject
    common = torch.promote_types(x.dtype, residual.dtype)
    return x.to(common), residual.to(common)


class RMSNorm(torch.nn.Module):
    """Drop-in for ``LlamaRMSNorm`` (same ``weight`` parameter name, ones at init) and, with
    ``offset``/``casting_mode``, for Liger's ``LigerRMSNorm`` (Gemma: ``offset=1.0,
    casting_mode="gemma"``; Gemma checkpoints store w for ``1 + w``, so load one or zero the weight).
    ``elementwise_affine=False``: no weight (``self.weight`` is None).

    ``forward(x)`` returns y; ``forward(x, residual)`` returns ``(y, x + residual)``.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        *,
        offset: float = 0.0,
        casting_mode: str = "llama",
        elementwise_affine: bool = True,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if casting_mode not in CASTING_MODES:
            raise ValueError(
                f"RMSNorm: casting_mode must be one of {', '.join(map(repr, CASTING_MODES))}, got {casting_mode!r}"
            )
        if not elementwise_affine and offset != 0:
            raise ValueError(
                f"RMSNorm: offset={offset!r} scales by (offset + weight) and needs elementwise_affine=True"
            )
        if elementwise_affine:
            self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.hidden_size = hidden_size
        self.variance_epsilon = eps
        self.offset = offset
        self.casting_mode = casting_mode
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(
            x,
            self.weight,
            self.variance_epsilon,
            residual=residual,
            offset=self.offset,
            casting_mode=self.casting_mode,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        options = "" if self.weight is not None else ", elementwise_affine=False"
        if self.offset != 0 or self.casting_mode != "llama":
            options += f", offset={self.offset}, casting_mode={self.casting_mode!r}"
        return f"{self.hidden_size}, eps={self.variance_epsilon}{options}, backend={self.backend!r}"


def _op_inputs(rows: int, width: int, dtype: torch.dtype, device, make=torch.randn):
    """x and weight: the forward kernel's example without its residual."""
    return _fwd_example(rows, width, dtype, device, make)[:2]


# Rows are d = hidden_size wide.
register_op(
    Op(
        "rms_norm",
        rms_norm,
        rms_norm_ref,
        (RMS_NORM_FWD, RMS_NORM_BWD),
        width="d",
        width_of=lambda config: config.hidden_size,
        inputs=_op_inputs,
    )
)
