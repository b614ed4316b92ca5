"""Rotary position embedding in Hugging Face's rotate-half convention, q and k in one launch.

Math, per head vector x of width D (D even, halves x1 = x[:D/2], x2 = x[D/2:]):

    rotate_half(x) = cat(-x2, x1)
    x' = x * cos + rotate_half(x) * sin
       = cat(x1 * cos1 - x2 * sin1,  x2 * cos2 + x1 * sin2)

with cos/sin given per token (so positions that restart inside a packed row are just other rows of
cos/sin). The backward is the transpose of that linear map,

    dx = cat(g1 * cos1 + g2 * sin2,  g2 * cos2 - g1 * sin1),

which is the forward with ``sin1, sin2 := -sin2, -sin1`` (for Hugging Face's cos/sin, where the two
halves are equal, simply the forward with sin negated); the same kernel runs both.

Shapes: q [B, Hq, T, D], k [B, Hkv, T, D] with any head counts (GQA's Hq a multiple of Hkv, but
also Hkv > Hq or Hq not a multiple: q and k are rotated apart, as Hugging Face's elementwise
``apply_rotary_pos_emb`` allows; every backend); cos and sin [T, D] or
[1, T, D] (shared by the batch, as transformers passes them) or [B, T, D]. Any strides are accepted, so the [B, T, H, D] layout is passed
as a view, ``q.transpose(1, 2)``, without a copy; outputs keep the input's memory layout (a
``[B, T, H, D]``-contiguous q gives a ``[B, T, H, D]``-contiguous result). cos and sin are constants:
no gradient flows to them.

Dtypes: q and k in fp32, fp16 or bf16 (the same); cos and sin in any of the three (fp32 cos/sin
with bf16 q is the most accurate); arithmetic in fp32 with one rounding per output. The reference
casts cos/sin to q's dtype first, as Hugging Face does.

Under ``torch.autocast`` nothing is cast (autocast leaves the eager code's multiplies and adds alone):
q and k come out of autocast's bf16 projections and the cos/sin tables are fp32; q' and k' are
rounded once to q's dtype, bf16, from fp32 arithmetic with the fp32 tables (Hugging Face's eager
code promotes q' to fp32 there and attention casts it back to bf16: the same values). Gradients
come back in q's and k's dtype.

Backends: the Triton kernel below, or its CUDA C++ twin (csrc/rotary.cu, the same formula and the
same transpose for the backward), under one custom op. Both are out-variant launchers of the record
``ROTARY`` (solar_kernels/ops/_registry.py), which allocates the outputs in the inputs' layouts,
picks the implementation and is what the fake uses.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import resolve_backend
from .._checks import check_float_tensor, check_same_device, check_same_device_dtype
from ._common import cast_to
from ._registry import Kernel, Op, custom_op, register, register_op

OP = "apply_rotary"
# Token rows per program: cos/sin for BLOCK_T tokens are loaded once and reused for every head.
# 1024 elements = 16 tokens x 64 half-columns for D = 128: 8 values per thread of 4 warps (~64
# registers, 8 programs per SM). The head loop is pipelined _STAGES deep: 3 heads' loads ahead.
_TILE_ELEMENTS = 1024
_STAGES = 4


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch rotary embedding (Hugging Face's ``apply_rotary_pos_emb``)."""
    cos = cos.to(q.dtype).unsqueeze(-3)  # [T, D] -> [1, T, D]; [B, T, D] -> [B, 1, T, D]
    sin = sin.to(q.dtype).unsqueeze(-3)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@triton.jit
def _rotate_heads(
    X,
    OUT,
    stride_x_b,
    stride_x_h,
    stride_x_t,
    stride_x_d,
    stride_o_b,
    stride_o_h,
    stride_o_t,
    stride_o_d,
    batch,
    tokens,
    half_cols,
    mask,
    n_heads,
    half,
    rotation,
    NUM_STAGES: tl.constexpr,
):
    """Every head of X [B, H, T, D] at this program's tokens, rotated by ``rotation`` (the tile's
    (cos1, cos2, sin1, sin2), loaded once for q and k), into OUT."""
    cos1, cos2, sin1, sin2 = rotation
    x_base = X + batch * stride_x_b + tokens[:, None] * stride_x_t + half_cols[None, :] * stride_x_d
    o_base = OUT + batch * stride_o_b + tokens[:, None] * stride_o_t + half_cols[None, :] * stride_o_d
    # Software-pipelined over heads: the next NUM_STAGES - 1 heads' halves are copied in (cp.async)
    # while this one is rotated, so the loop is not one load round trip per head.
    for head in tl.range(0, n_heads, num_stages=NUM_STAGES):
        x_ptr = x_base + head * stride_x_h
        o_ptr = o_base + head * stride_o_h
        x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + half * stride_x_d, mask=mask, other=0.0).to(tl.float32)
        tl.store(o_ptr, cast_to(x1 * cos1 - x2 * sin1, OUT.dtype.element_ty), mask=mask)
        tl.store(o_ptr + half * stride_o_d, cast_to(x2 * cos2 + x1 * sin2, OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    Q,
    K,
    COS,
    SIN,
    QO,
    KO,
    stride_q_b,
    stride_q_h,
    stride_q_t,
    stride_q_d,
    stride_k_b,
    stride_k_h,
    stride_k_t,
    stride_k_d,
    stride_qo_b,
    stride_qo_h,
    stride_qo_t,
    stride_qo_d,
    stride_ko_b,
    stride_ko_h,
    stride_ko_t,
    stride_ko_d,
    stride_cos_b,
    stride_cos_t,
    stride_cos_d,
    stride_sin_b,
    stride_sin_t,
    stride_sin_d,
    n_tokens,
    n_heads_q,
    n_heads_k,
    half,
    BACKWARD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    batch = tl.program_id(1).to(tl.int64)
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    half_cols = tl.arange(0, BLOCK_HALF)
    mask = (tokens[:, None] < n_tokens) & (half_cols[None, :] < half)
    cos_ptr = COS + batch * stride_cos_b + tokens[:, None] * stride_cos_t + half_cols[None, :] * stride_cos_d
    sin_ptr = SIN + batch * stride_sin_b + tokens[:, None] * stride_sin_t + half_cols[None, :] * stride_sin_d
    cos1 = tl.load(cos_ptr, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + half * stride_cos_d, mask=mask, other=0.0).to(tl.float32)
    sin_lo = tl.load(sin_ptr, mask=mask, other=0.0).to(tl.float32)
    sin_hi = tl.load(sin_ptr + half * stride_sin_d, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # The transposed rotation: the forward with sin1 := -sin2 and sin2 := -sin1.
        sin1 = -sin_hi
        sin2 = -sin_lo
    else:
        sin1 = sin_lo
        sin2 = sin_hi
    rotation = (cos1, cos2, sin1, sin2)
    _rotate_heads(
        Q,
        QO,
        stride_q_b,
        stride_q_h,
        stride_q_t,
        stride_q_d,
        stride_qo_b,
        stride_qo_h,
        stride_qo_t,
        stride_qo_d,
        batch,
        tokens,
        half_cols,
        mask,
        n_heads_q,
        half,
        rotation,
        NUM_STAGES,
    )
    _rotate_heads(
        K,
        KO,
        stride_k_b,
        stride_k_h,
        stride_k_t,
        stride_k_d,
        stride_ko_b,
        stride_ko_h,
        stride_ko_t,
        stride_ko_d,
        batch,
        tokens,
        half_cols,
        mask,
        n_heads_k,
        half,
        rotation,
        NUM_STAGES,
    )


def _empty_like_layout(x: torch.Tensor) -> torch.Tensor:
    """A new tensor with x's memory layout when x is dense (a permuted view keeps its order)."""
    return torch.empty_like(x, memory_format=torch.preserve_format)


def _batched_strides(table: torch.Tensor) -> tuple[int, int, int]:
    """(batch, token, column) strides of a cos/sin table; batch stride 0 for [T, D] and [1, T, D]."""
    if table.dim() == 2:
        return 0, table.stride(0), table.stride(1)
    return (table.stride(0) if table.shape[0] > 1 else 0), table.stride(1), table.stride(2)


def _rotary_triton(q, k, cos, sin, q_out, k_out, backward: bool = False) -> None:
    """q' and k' (their transposed rotation when ``backward``), written into q_out and k_out."""
    batch, n_heads_q, n_tokens, head_dim = q.shape
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_t = max(1, min(64, _TILE_ELEMENTS // block_half, triton.next_power_of_2(n_tokens)))
    grid = (triton.cdiv(n_tokens, block_t), batch)
    _rotary_kernel[grid](
        q,
        k,
        cos,
        sin,
        q_out,
        k_out,
        *q.stride(),
        *k.stride(),
        *q_out.stride(),
        *k_out.stride(),
        *_batched_strides(cos),
        *_batched_strides(sin),
        n_tokens,
        n_heads_q,
        k.shape[1],
        half,
        BACKWARD=backward,
        BLOCK_T=block_t,
        BLOCK_HALF=block_half,
        NUM_STAGES=_STAGES,
        num_warps=4,
    )


def _rotary_outputs(q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    return _empty_like_layout(q), _empty_like_layout(k)


def _rotary_rows_width(q, k, cos, sin) -> tuple[int, int]:
    """auto's shape class: rows are tokens, each (Hq + Hkv) * D wide."""
    batch, n_heads_q, n_tokens, head_dim = q.shape
    return batch * n_tokens, (n_heads_q + k.shape[1]) * head_dim


def _rotary_example(rows: int, width: int, dtype: torch.dtype, device, make=torch.randn):
    """q, k, cos, sin for ``rows`` tokens of about ``width`` = (Hq + Hkv) * D columns: heads of 128
    (narrower, even, for narrow widths), a fifth of them k heads as in SOLAR (32 + 8 heads at 5120)."""
    head_dim = 128 if width >= 256 else max(2, width // 4 * 2)
    heads = max(2, width // head_dim)
    kv_heads = max(1, heads // 5)
    q = make(1, heads - kv_heads, rows, head_dim, dtype=dtype, device=device)
    k = make(1, kv_heads, rows, head_dim, dtype=dtype, device=device)
    cos, sin = (make(rows, head_dim, dtype=dtype, device=device) for _ in range(2))
    return q, k, cos, sin


# (q, k, cos, sin) -> (q', k') in q's and k's layouts; the CUDA op (csrc/rotary.cu, rotary_host.cpp)
# takes backward after the outputs.
ROTARY = register(
    Kernel(
        "rotary",
        "rotary",
        triton=_rotary_triton,
        rows_width=_rotary_rows_width,
        example=_rotary_example,
        allocator=_rotary_outputs,
        variants=({"backward": False}, {"backward": True}),
    )
)


@custom_op("apply_rotary", fake=lambda q, k, cos, sin, backward, backend: ROTARY.allocate(q, k, cos, sin))
def _rotary_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return ROTARY.launch(backend, q, k, cos, sin, backward=backward)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, backward, backend = inputs
    ctx.save_for_backward(cos, sin)
    ctx.backward, ctx.backend = backward, backend


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq, dk = _rotary_op(dq, dk, cos, sin, not ctx.backward, ctx.backend)
    return dq, dk, None, None, None, None


torch.library.register_autograd("solar_kernels::apply_rotary", _backward, setup_context=_setup_context)


def _check_args(q, k, cos, sin):
    check_float_tensor(OP, "q", q, ndims=(4,))
    check_float_tensor(OP, "k", k, ndims=(4,))
    check_same_device_dtype(OP, "q", q, k=k)
    check_float_tensor(OP, "cos", cos, ndims=(2, 3))
    check_float_tensor(OP, "sin", sin, ndims=(2, 3))
    check_same_device(OP, "q", q, cos=cos, sin=sin)
    batch, n_heads_q, n_tokens, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"{OP}: head_dim must be even (rotate-half pairs its halves), got q.shape[-1] = {head_dim}")
    if k.shape[0] != batch or k.shape[2:] != q.shape[2:]:
        raise ValueError(
            f"{OP}: k must be [B, Hkv, T, D] = [{batch}, Hkv, {n_tokens}, {head_dim}] to match q "
            f"{tuple(q.shape)}, got {tuple(k.shape)}"
        )
    for name, table in (("cos", cos), ("sin", sin)):
        expected = [(n_tokens, head_dim), (batch, n_tokens, head_dim), (1, n_tokens, head_dim)]
        if tuple(table.shape) not in expected:
            raise ValueError(
                f"{OP}: {name} must be [T, D] = {expected[0]} or [B, T, D] = {expected[1]} "
                f"(B may be 1), got {tuple(table.shape)}"
            )


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, Hq, T, D] and k [B, Hkv, T, D] by per-token cos/sin ([T, D], [1, T, D] or [B, T, D]).

    Returns new tensors (q', k'). For the [B, T, H, D] layout pass ``q.transpose(1, 2)`` and
    transpose the results back; no copy is made either way.
    """
    _check_args(q, k, cos, sin)
    resolved = resolve_backend(OP, backend, q.device)
    if resolved == "torch":
        return apply_rotary_ref(q, k, cos, sin)
    return _rotary_op(q, k, cos, sin, False, resolved)


register_op(
    Op(
        "apply_rotary",
        apply_rotary,
        apply_rotary_ref,
        (ROTARY,),
        width="qkv_size",
        width_of=lambda config: (config.num_heads + config.num_kv_heads) * config.head_dim,
        grad_inputs=2,
    )
)
