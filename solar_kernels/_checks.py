"""Argument checks shared by the ops: each raises before any kernel runs, naming the op, the
argument, what was expected and what was given."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_finite_number(value: object) -> bool:
    """``value`` is a finite real number (``int``, ``float``, ``numpy`` scalars, ``Fraction``), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_float_tensor(
    op: str, name: str, tensor: object, ndims: Iterable[int] | None = None, dtypes=FLOAT_DTYPES
) -> None:
    """``tensor`` is a non-empty tensor of one of ``dtypes`` with one of the ranks in ``ndims``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in dtypes:
        names = [str(d).replace("torch.", "") for d in dtypes]
        expected = ", ".join(names[:-1]) + " or " + names[-1]
        raise TypeError(f"{op}: {name} must be {expected}, got {tensor.dtype}")
    check_rank(op, name, tensor, ndims)
    if tensor.numel() == 0:
        raise ValueError(f"{op}: {name} must not be empty, got shape {tuple(tensor.shape)}")


def check_rank(op: str, name: str, tensor: torch.Tensor, ndims: Iterable[int] | None) -> None:
    if ndims is None:
        if tensor.dim() == 0:
            raise ValueError(f"{op}: {name} must have at least 1 dimension, got a 0-d tensor")
        return
    ndims = tuple(ndims)
    if tensor.dim() not in ndims:
        expected = " or ".join(str(n) for n in ndims)
        raise ValueError(
            f"{op}: {name} must have {expected} dimensions, got {tensor.dim()} (shape {tuple(tensor.shape)})"
        )


def check_same_device_dtype(op: str, reference_name: str, reference: torch.Tensor, **others) -> None:
    """Every tensor in ``others`` (None skipped) is on ``reference``'s device with its dtype."""
    for name, tensor in others.items():
        if tensor is None:
            continue
        if tensor.device != reference.device:
            raise ValueError(
                f"{op}: {name} is on {tensor.device}, expected {reference.device} (the device of {reference_name})"
            )
        if tensor.dtype != reference.dtype:
            raise TypeError(
                f"{op}: {name} has dtype {tensor.dtype}, expected {reference.dtype} (the dtype of {reference_name})"
            )


def check_same_device(op: str, reference_name: str, reference: torch.Tensor, **others) -> None:
    for name, tensor in others.items():
        if tensor is not None and tensor.device != reference.device:
            raise ValueError(
                f"{op}: {name} is on {tensor.device}, expected {reference.device} (the device of {reference_name})"
            )


def check_shape(op: str, name: str, tensor: torch.Tensor, expected: tuple, why: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} has shape {tuple(tensor.shape)}, expected {tuple(expected)} ({why})")
