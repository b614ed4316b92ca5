from __future__ import annotations

import pytest
import torch

import solar_kernels as sk
from solar_kernels._backend import TRITON_INTERPRETED, resolve_backend, unavailable_reason


def test_none_picks_triton_where_it_runs(device):
    if device.type == "cuda" and unavailable_reason("cuda", device) is None:
        pytest.skip("with the CUDA extension a GPU resolves None to 'auto' (test_none_is_auto_...)")
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
    reason = r"the CUDA C\+\+ (kernels of solar_kernels\._C run on CUDA devices only, got a cpu tensor|extension .* is not built)"
    with pytest.raises(RuntimeError, match=f"rms_norm: backend 'cuda' is not available on cpu: {reason}"):
        sk.rms_norm(torch.randn(2, 4), torch.ones(4), backend="cuda")


def test_cuda_backend_without_the_extension_says_not_built(monkeypatch):
    import sys

    from solar_kernels import _cuda

    monkeypatch.setattr(_cuda, "_load_error", _cuda._NOT_TRIED)
    monkeypatch.setitem(sys.modules, "solar_kernels._C", None)  # import fails as when it was never built
    with pytest.raises(
        RuntimeError,
        match="backend 'cuda' is not available on cpu: the CUDA C\\+\\+ extension "
        "solar_kernels._C is not built in this install",
    ):
        sk.swiglu(torch.randn(2, 4), torch.randn(2, 4), backend="cuda")


def _fresh_python(code: str) -> str:
    """What ``code`` prints, run in a fresh interpreter (nothing this process imported is loaded
    there); its stderr when it fails."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def test_import_never_loads_the_extension_and_works_without_it():
    assert (
        _fresh_python(
            "import sys; sys.modules['solar_kernels._C'] = None\n"
            "import torch, solar_kernels as sk\n"
            "assert sk.rms_norm(torch.ones(2, 4), torch.ones(4), backend='torch').shape == (2, 4)\n"
            "from solar_kernels._backend import resolve_backend, unavailable_reason\n"
            "assert resolve_backend('op', 'auto', torch.device('cpu')) in ('torch', 'triton')\n"
            "assert 'not built' in unavailable_reason('cuda', torch.device('cuda'))\n"
            "print('ok')\n"
        )
        == "ok"
    )
    assert _fresh_python("import sys, solar_kernels; print('solar_kernels._C' in sys.modules)") == "False"


def test_first_backend_resolution_inside_torch_compile_is_not_a_graph_break():
    """Loading the extension on first use happens at trace time, outside the graph (fullgraph holds)."""
    assert (
        _fresh_python(
            "import sys, torch\n"
            "from solar_kernels._backend import unavailable_reason\n"
            "def f(x):\n"
            "    return x + (0 if unavailable_reason('cuda', x.device) is None else 1)\n"
            "assert torch.compile(f, backend='eager', fullgraph=True)(torch.zeros(2)).tolist() == [1.0, 1.0]\n"
            "print('ok')\n"
        )
        == "ok"
    )


def _availability(monkeypatch, **runs):
    """Pretend that the named backends run (True) or not (False) on every device."""
    import solar_kernels._backend as backend

    monkeypatch.setattr(backend, "unavailable_reason", lambda name, device: None if runs.get(name, True) else "no")
    return backend


def test_none_is_auto_where_triton_and_cuda_both_run(monkeypatch):
    backend = _availability(monkeypatch, triton=True, cuda=True)
    gpu = torch.device("cuda", 0)
    assert backend.resolve_backend("op", None, gpu) == "auto"
    assert backend.resolve_backend("op", "auto", gpu) == "auto"
    monkeypatch.setenv("SOLAR_KERNELS_BACKEND", "cuda")  # the variable forces one backend
    assert backend.resolve_backend("op", None, gpu) == "cuda"
    monkeypatch.setenv("SOLAR_KERNELS_BACKEND", "triton")
    assert backend.resolve_backend("op", None, gpu) == "triton"
    monkeypatch.setenv("SOLAR_KERNELS_BACKEND", "auto")
    assert backend.resolve_backend("op", None, gpu) == "auto"


@pytest.mark.parametrize(
    "triton_runs, cuda_runs, expected", [(True, False, "triton"), (False, True, "cuda"), (False, False, "torch")]
)
def test_auto_falls_back_to_what_runs(monkeypatch, triton_runs, cuda_runs, expected):
    backend = _availability(monkeypatch, triton=triton_runs, cuda=cuda_runs)
    assert backend.resolve_backend("op", None, torch.device("cuda", 0)) == expected


def test_auto_never_picks_cuda_for_cpu_tensors(monkeypatch):
    backend = _availability(monkeypatch, triton=True, cuda=True)
    assert backend.resolve_backend("op", None, torch.device("cpu")) == "triton"


@pytest.mark.parametrize(
    "archs, capability, runs",
    [
        (("sm_80", "sm_90a"), (8, 0), True),
        (("sm_80", "sm_90a"), (8, 6), True),  # an sm_80 cubin runs on later 8.x
        (("sm_80", "sm_90a"), (8, 9), True),
        (("sm_80", "sm_90a"), (9, 0), True),
        (("sm_80", "sm_90a"), (10, 0), False),  # no Blackwell code, and 9.0a is Hopper-only
        (("sm_80", "sm_90a"), (7, 5), False),
        (("sm_90a",), (9, 0), True),
        (("sm_86",), (8, 0), False),
        (("sm_80", "compute_80"), (12, 0), True),  # PTX is compiled for newer GPUs
        (("sm_90a", "compute_90a"), (10, 0), False),
    ],
)
def test_which_gpus_a_build_runs_on(archs, capability, runs):
    from solar_kernels._cuda import runs_on

    assert runs_on(archs, capability) is runs


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
