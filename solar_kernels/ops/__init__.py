"""The fused kernels, one op per file; each file holds its ``*_ref`` PyTorch reference."""

from __future__ import annotations

from .cross_entropy import CrossEntropyOutput, cross_entropy, cross_entropy_ref
from .dpo_loss import LOSS_TYPES, dpo_loss, dpo_loss_ref
from .linear_logprobs import (
    linear_cross_entropy,
    linear_cross_entropy_ref,
    linear_logprobs,
    linear_logprobs_ref,
    sequence_logprobs,
    sequence_logprobs_ref,
)
from .rms_norm import RMSNorm, rms_norm, rms_norm_ref
from .rotary import apply_rotary, apply_rotary_ref
from .swiglu import SwiGLU, swiglu, swiglu_ref

__all__ = [
    "CrossEntropyOutput",
    "LOSS_TYPES",
    "RMSNorm",
    "SwiGLU",
    "apply_rotary",
    "apply_rotary_ref",
    "cross_entropy",
    "cross_entropy_ref",
    "dpo_loss",
    "dpo_loss_ref",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "linear_logprobs",
    "linear_logprobs_ref",
    "rms_norm",
    "rms_norm_ref",
    "sequence_logprobs",
    "sequence_logprobs_ref",
    "swiglu",
    "swiglu_ref",
]
