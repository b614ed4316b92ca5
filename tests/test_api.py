"""The public API as a user meets it: names, output dtypes, and no input ever written."""

from __future__ import annotations

import pytest
import torch

import solar_kernels as sk

PUBLIC = [
    "rms_norm",
    "apply_rotary",
    "swiglu",
    "linear_logprobs",
    "linear_cross_entropy",
    "sequence_logprobs",
    "dpo_loss",
    "RMSNorm",
    "SwiGLU",
    "cross_entropy",
    "CrossEntropyOutput",
]


def test_public_names():
    for name in PUBLIC:
        assert name in sk.__all__ and hasattr(sk, name)


def _calls(device, dtype, backend="triton"):
    hidden = torch.randn(2, 5, 16, device=device, dtype=dtype)
    weight = torch.randn(40, 16, device=device, dtype=dtype)
    labels = torch.randint(0, 40, (2, 5), device=device)
    labels[0, :2] = -100
    q, k = torch.randn(1, 4, 5, 8, device=device, dtype=dtype), torch.randn(1, 2, 5, 8, device=device, dtype=dtype)
    cos, sin = torch.randn(5, 8, device=device), torch.randn(5, 8, device=device)
    x, r = torch.randn(3, 16, device=device, dtype=dtype), torch.randn(3, 16, device=device, dtype=dtype)
    w = torch.randn(16, device=device, dtype=dtype)
    pairs = [torch.randn(4, device=device) for _ in range(4)]
    logits = torch.randn(10, 40, device=device, dtype=dtype, requires_grad=True)  # Liger writes its grad here
    return [
        ("rms_norm", lambda: sk.rms_norm(x, w, residual=r, backend=backend), [x, r, w], dtype),
        ("apply_rotary", lambda: sk.apply_rotary(q, k, cos, sin, backend=backend), [q, k, cos, sin], dtype),
        ("swiglu", lambda: sk.swiglu(x, r, backend=backend), [x, r], dtype),
        (
            "linear_logprobs",
            lambda: sk.linear_logprobs(hidden, weight, labels, backend=backend),
            [hidden, weight, labels],
            torch.float32,
        ),
        (
            "linear_cross_entropy",
            lambda: sk.linear_cross_entropy(hidden, weight, labels, backend=backend),
            [hidden, weight, labels],
            torch.float32,
        ),
        (
            "sequence_logprobs",
            lambda: sk.sequence_logprobs(hidden, weight, labels, backend=backend),
            [hidden, weight, labels],
            torch.float32,
        ),
        ("dpo_loss", lambda: sk.dpo_loss(*pairs), pairs, torch.float32),
        (
            "cross_entropy",
            lambda: sk.cross_entropy(logits, labels.view(-1), label_smoothing=0.1, backend=backend),
            [logits, labels],
            dtype,
        ),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_no_input_is_written_and_dtypes(dtype, device, kernel_backend):
    for name, call, inputs, out_dtype in _calls(device, dtype, backend=kernel_backend):
        before = [t.clone() for t in inputs]
        outputs = call()
        for out in outputs if isinstance(outputs, tuple) else (outputs,):
            assert out.dtype == out_dtype, (name, out.dtype)
            assert all(out.data_ptr() != t.data_ptr() for t in inputs), name
        for old, new in zip(before, inputs):
            assert torch.equal(old, new), f"{name} wrote into an input"
