"""What the ops do under ``torch.autocast``: each follows what autocast does to the eager PyTorch code
it replaces (each op's module docstring states its rule), decided in its Python wrapper.

- The LM-head ops cast their matmul inputs as autocast casts ``F.linear``'s (``cast_like_linear``).
- The elementwise ops (RMSNorm, rotary, SwiGLU) are left alone by autocast in eager code, so they
  cast nothing; they only follow eager type promotion where autocast makes mixed dtypes meet.

The casts happen outside the custom ops, so autograd records them and every gradient comes back in
its leaf's dtype (an fp32 weight gets an fp32 grad). Inside a custom op autocast is still switched
on (the dispatcher passes it through), so bodies that call matmuls run them under
``autocast_disabled``: their dtypes are decided once, by the wrapper.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# The dtypes autocast casts (it leaves float64, integers and bools alone).
_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` casts matmul inputs to on ``device``, or None where it is off."""
    if not torch.amp.is_autocast_available(device.type) or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def autocast_on(device: torch.device) -> bool:
    return autocast_dtype(device) is not None


def cast_like_linear(*tensors):
    """``tensors`` as autocast casts ``F.linear``'s inputs: fp32/fp16/bf16 tensors on an autocast
    device in the autocast dtype; anything else (None, float64, a non-tensor) as it is, for the
    argument checks to judge."""
    return tuple(_cast(t) for t in tensors)


def _cast(tensor):
    if not isinstance(tensor, torch.Tensor) or tensor.dtype not in _ELIGIBLE:
        return tensor
    dtype = autocast_dtype(tensor.device)
    return tensor.to(dtype) if dtype is not None else tensor


@contextlib.contextmanager
def autocast_disabled(device: torch.device) -> Iterator[None]:
    """Autocast off on ``device`` for a custom op's body (a no-op where autocast does not exist)."""
    if not torch.amp.is_autocast_available(device.type):
        yield
        return
    with torch.autocast(device.type, enabled=False):
        yield
