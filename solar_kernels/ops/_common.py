"""What the Triton ops share: row views, launch sizes, and the rounding of outputs."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._backend import TRITON_INTERPRETED

# Triton's interpreter casts fp32 -> bf16 by truncating the mantissa, where compiled kernels round
# to nearest even (checked with triton 3.8: half of random values came out 1 ulp low). Under the
# interpreter the rounding is done by hand, so CPU tests see the numerics of the GPU.
ROUND_BF16_BY_HAND = tl.constexpr(TRITON_INTERPRETED)


@triton.jit
def cast_to(x, dtype: tl.constexpr):
    """``x.to(dtype)`` with round-to-nearest-even, on a GPU and under the interpreter alike."""
    if ROUND_BF16_BY_HAND:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


# Under the interpreter every program runs as Python: fewer, larger programs keep the tests fast.
_CPU_PROGRAMS = 4


def as_rows(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """``tensor`` [..., width] as a 2-D [rows, width] tensor with unit column stride.

    A view when the leading dims can be merged (row-strided slices such as ``x[:, :d]`` stay views);
    a contiguous copy otherwise, so any input layout gives the right answer.
    """
    rows = tensor.reshape(-1, width)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def persistent_programs(device: torch.device, work_items: int, per_sm: int = 4) -> int:
    """Programs for a grid-stride launch: a few per SM on a GPU, a handful under the interpreter."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        limit = _sm_count(index) * per_sm
    else:
        limit = _CPU_PROGRAMS
    return max(1, min(work_items, limit))


def warps_for(elements_per_program: int, elements_per_thread: int = 16) -> int:
    """Warps so each thread holds about ``elements_per_thread`` fp32 values (1 to 16 warps)."""
    warps = elements_per_program // (32 * elements_per_thread)
    return max(1, min(16, triton.next_power_of_2(max(warps, 1))))
