from __future__ import annotations

import pytest
import torch

import solar_kernels as sk
from tests.helpers import assert_compiles_like_eager
from tests.helpers import check_swiglu as check
from tests.tolerances import DTYPE_IDS, DTYPES


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(3, 1), (2, 5, 123), (4, 4097), (3, 14336), (2, 65536)])
def test_matches_reference(shape, dtype, device, kernel_backend):
    gate = torch.randn(shape, dtype=dtype, device=device) * 3
    up = torch.randn(shape, dtype=dtype, device=device)
    check(gate, up, backend=kernel_backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_halves_of_fused_projection(dtype, device, kernel_backend):
    """gate and up as the two halves of one [N, 2I] projection output: strided views, no copy."""
    fused = torch.randn(2, 7, 2 * 123, dtype=dtype, device=device) * 2
    gate, up = fused.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    check(gate, up, backend=kernel_backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_transposed_inputs(dtype, device, kernel_backend):
    gate = torch.randn(123, 9, dtype=dtype, device=device).t()
    up = torch.randn(9, 123, dtype=dtype, device=device)
    check(gate, up, backend=kernel_backend)


def test_does_not_write_inputs(device, kernel_backend):
    gate, up = torch.randn(5, 64, device=device), torch.randn(5, 64, device=device)
    saved = gate.clone(), up.clone()
    y = sk.swiglu(gate, up, backend=kernel_backend)
    assert torch.equal(saved[0], gate) and torch.equal(saved[1], up)
    assert y.data_ptr() not in (gate.data_ptr(), up.data_ptr())


def test_module_matches_transformers_llama_mlp(device, kernel_backend):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = LlamaConfig(
        hidden_size=48, intermediate_size=80, num_attention_heads=4, num_key_value_heads=2, hidden_act="silu"
    )
    hf = LlamaMLP(config).to(device)
    ours = sk.SwiGLU(48, 80, backend=kernel_backend, device=device)
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(3, 4, 48, device=device)
    torch.testing.assert_close(ours(x), hf(x))


def test_torch_compile_fullgraph(device, kernel_backend):
    gate = torch.randn(6, 40, device=device, requires_grad=True)
    up = torch.randn(6, 40, device=device, requires_grad=True)

    def f(gate, up):
        return (sk.swiglu(gate, up, backend=kernel_backend) ** 2).sum()

    assert_compiles_like_eager(f, gate, up)


@pytest.mark.parametrize(
    "gate, up, error, message",
    [
        (
            torch.ones(3, 4, dtype=torch.int32),
            torch.ones(3, 4, dtype=torch.int32),
            TypeError,
            "gate must be float32, float16 or bfloat16, got torch.int32",
        ),
        (torch.randn(3, 4), torch.randn(3, 5), ValueError, r"up has shape \(3, 5\), expected \(3, 4\)"),
        (
            torch.randn(3, 4),
            torch.randn(3, 4, dtype=torch.bfloat16),
            TypeError,
            "up has dtype torch.bfloat16, expected torch.float32",
        ),
        (torch.randn(3, 4), torch.randn(3, 4, device="meta"), ValueError, "up is on meta, expected cpu"),
        (torch.randn(3, 0), torch.randn(3, 0), ValueError, "gate must not be empty"),
    ],
)
def test_bad_input(gate, up, error, message):
    with pytest.raises(error, match=message):
        sk.swiglu(gate, up)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_solar_shapes_on_gpu(dtype, kernel_backend):
    gate = torch.randn(4096, 14336, dtype=dtype, device="cuda")
    check(gate, torch.randn_like(gate), backend=kernel_backend)
