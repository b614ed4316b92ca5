import pytest
import torch

import solar_kernels as sk
from solar_kernels._backend import TRITON_INTERPRETED, resolve_backend


def test_auto_picks_triton_where_it_runs(device):
    expected = "triton" if device.type == "cuda" or TRITON_INTERPRETED else "torch"
    assert resolve_backend("op", None, device) == expected


def test_environment_variable_names_the_backend(monkeypatch):
    monkeypatch.setenv("SOLAR_KERNELS_BACKEND", "torch")
    assert resolve_backend("op", None, torch.device("cpu")) == "torch"
    monkeypatch.setenv("SOLAR_KERNELS_BACKEND", "tpu")
    with pytest.raises(ValueError, match="op: SOLAR_KERNELS_BACKEND must be one of .*got 'tpu'"):
        resolve_backend("op", None, torch.device("cpu"))


def test_explicit_backend_wins_over_environment(monkeypatch):
    monkeypatch.setenv("SOLAR_KERNELS_BACKEND", "cuda")
    assert resolve_backend("op", "torch", torch.device("cpu")) == "torch"


def test_cuda_backend_raises_with_reason():
    with pytest.raises(RuntimeError, match="rms_norm: backend 'cuda' is not available on cpu: the CUDA C"):
        sk.rms_norm(torch.randn(2, 4), torch.ones(4), backend="cuda")


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="swiglu: backend must be one of"):
        sk.swiglu(torch.randn(2, 4), torch.randn(2, 4), backend="Triton")


def test_torch_backend_is_the_reference(device):
    x, w = torch.randn(3, 16, device=device), torch.randn(16, device=device)
    assert torch.equal(sk.rms_norm(x, w, backend="torch"), sk.rms_norm_ref(x, w))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU without the interpreter")
def test_triton_on_cpu_without_interpreter_explains(monkeypatch):
    import solar_kernels._backend as backend

    monkeypatch.setattr(backend, "TRITON_INTERPRETED", False)
    assert backend.resolve_backend("op", None, torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.resolve_backend("op", "triton", torch.device("cpu"))
