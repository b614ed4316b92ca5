"""Test set-up: Triton runs through its interpreter on CPU-only machines.

TRITON_INTERPRET must be set before solar_kernels (and so triton.jit) is imported; on a machine
with a CUDA GPU the same tests run the compiled kernels on the GPU instead.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Inputs are freshly drawn for every test case; the base seed makes a failure reproducible.
BASE_SEED = int(os.environ.get("SOLAR_TEST_SEED", "0"))


def pytest_report_header(config):
    where = "CUDA " + torch.cuda.get_device_name() if HAS_CUDA else "CPU (TRITON_INTERPRET=1)"
    return [f"solar_kernels tests on {where}; SOLAR_TEST_SEED={BASE_SEED}"]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True, scope="session")
def _private_autotune_cache(tmp_path_factory):
    """Tests never read or write the user's auto-backend choices (~/.cache/solar_kernels)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOLAR_KERNELS_AUTOTUNE_CACHE", str(tmp_path_factory.mktemp("autotune") / "autotune.json"))
        yield


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(BASE_SEED * 1_000_003 + sum(map(ord, request.node.nodeid)))


@pytest.fixture
def device():
    """Where the Triton backend runs: the GPU when there is one, else the CPU interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


def _require_cuda_backend():
    """On a GPU the CUDA C++ extension must be built and run: its absence fails a test rather than
    skipping it, unless the install left it out on purpose (SOLAR_KERNELS_SKIP_CUDA=1)."""
    from solar_kernels._backend import unavailable_reason

    reason = unavailable_reason("cuda", torch.device("cuda"))
    if reason is not None:
        if os.environ.get("SOLAR_KERNELS_SKIP_CUDA") == "1":
            pytest.skip(reason)
        pytest.fail(f"backend 'cuda' does not run on this GPU: {reason}")


@pytest.fixture(params=["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def kernel_backend(request):
    """Each fast backend in turn: Triton (on a CPU through its interpreter), and the CUDA C++
    extension on a GPU."""
    if request.param == "cuda":
        _require_cuda_backend()
    return request.param


@pytest.fixture(params=["torch", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def any_backend(request):
    """Every backend in turn, PyTorch's included: for ops whose torch backend is an algorithm of its
    own (the chunked log-probs), not just the ``*_ref`` reference the tests compare against."""
    if request.param == "cuda":
        _require_cuda_backend()
    return request.param


@pytest.fixture
def cuda_ops():
    """``torch.ops.solar_kernels_C``, for tests of the CUDA ops themselves (mark them ``gpu``)."""
    _require_cuda_backend()
    return torch.ops.solar_kernels_C
