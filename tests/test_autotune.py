"""The auto backend's decisions, on the CPU: fake timings stand in for the GPU measurement."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

from solar_kernels import _autotune, _cuda
from solar_kernels._autotune import AutoBackend, pick, representative_shape, shape_class
from solar_kernels.ops import _registry

ALL_CLASSES = [f"{w}/{r}" for w in ("narrow", "mid", "wide") for r in ("few", "many")]


class FakeTimings:
    """measure(kernel, cls, backend) from a table of milliseconds (a callable value may raise)."""

    def __init__(self, ms=None, default=None):
        self.ms = ms or {}
        self.default = default or {"triton": 2.0, "cuda": 1.0}
        self.calls = []

    def __call__(self, kernel, cls, backend):
        self.calls.append((kernel, cls, backend))
        value = self.ms.get((kernel, cls, backend), self.default[backend])
        return value() if callable(value) else value


def tuner(tmp_path, measure, device="NVIDIA H100 80GB HBM3", version="0.1.0"):
    return AutoBackend(device, version, measure, cache_path=str(tmp_path / "autotune.json"))


@pytest.mark.parametrize(
    "rows, width, expected",
    [
        (1, 1, "narrow/few"),
        (511, 1024, "narrow/few"),
        (512, 1025, "mid/many"),
        (1, 8192, "mid/few"),
        (10**6, 8193, "wide/many"),
        (16384, 4096, "mid/many"),
        (2048, 32000, "wide/many"),
    ],
)
def test_shape_classes(rows, width, expected):
    assert shape_class(rows, width) == expected


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_representative_shape_lies_in_its_class(cls):
    rows, width = representative_shape(cls)
    assert shape_class(rows, width) == cls
    assert rows * width <= 2**25  # one bf16 operand of at most 64 MB


def test_faster_backend_wins_per_kernel_and_class(tmp_path):
    timings = FakeTimings({("swiglu_fwd", "mid/many", "triton"): 0.5})
    auto = tuner(tmp_path, timings)
    assert auto.choose("swiglu_fwd", 4096, 4096) == "triton"
    assert auto.choose("swiglu_fwd", 8, 4096) == "cuda"  # another class: the default timings
    assert auto.choose("rms_norm_fwd", 4096, 4096) == "cuda"  # another kernel
    assert len(timings.calls) == 6  # both backends, three times


def test_ties_and_double_failures_go_to_triton_and_a_failure_loses(tmp_path):
    def boom():
        raise RuntimeError("out of memory")

    timings = FakeTimings(
        {
            ("rotary", "narrow/few", "cuda"): 2.0,  # a tie
            ("rotary", "mid/few", "triton"): boom,  # triton fails
            ("rotary", "wide/few", "triton"): boom,
            ("rotary", "wide/few", "cuda"): boom,  # both fail
            ("rotary", "wide/many", "cuda"): math.nan,  # nonsense timing
        }
    )
    auto = tuner(tmp_path, timings)
    assert auto.choose("rotary", 8, 512) == "triton"
    assert auto.choose("rotary", 8, 4096) == "cuda"
    assert auto.choose("rotary", 8, 10**5) == "triton"
    assert auto.choose("rotary", 10**5, 10**5) == "triton"


def test_each_class_is_measured_once_then_reused_from_the_file(tmp_path):
    first = FakeTimings()
    assert tuner(tmp_path, first).choose("logprobs", 2048, 32000) == "cuda"
    assert tuner(tmp_path, first).choose("logprobs", 4096, 50000) == "cuda"  # same class, new instance
    assert len(first.calls) == 2
    second = FakeTimings({("logprobs", "wide/many", "cuda"): 9.0})  # would now pick triton if asked
    assert tuner(tmp_path, second).choose("logprobs", 2048, 32000) == "cuda"
    assert second.calls == []
    entry = json.loads((tmp_path / "autotune.json").read_text())["NVIDIA H100 80GB HBM3 | solar_kernels 0.1.0"]
    assert entry["choices"] == {"logprobs": {"wide/many": "cuda"}}
    assert entry["ms"]["logprobs"]["wide/many"] == {"triton": 2.0, "cuda": 1.0}
    assert entry["torch"] == torch.__version__


def test_cache_is_keyed_by_device_name_and_version(tmp_path):
    prefer_triton = FakeTimings(default={"triton": 1.0, "cuda": 2.0})
    prefer_cuda = FakeTimings()
    assert tuner(tmp_path, prefer_cuda, device="NVIDIA H100 80GB HBM3").choose("swiglu_bwd", 4096, 4096) == "cuda"
    assert tuner(tmp_path, prefer_triton, device="NVIDIA H200").choose("swiglu_bwd", 4096, 4096) == "triton"
    assert tuner(tmp_path, prefer_triton, version="0.2.0").choose("swiglu_bwd", 4096, 4096) == "triton"
    assert len(prefer_triton.calls) == 4  # measured for the other GPU and for the other version
    keys = set(json.loads((tmp_path / "autotune.json").read_text()))
    assert keys == {
        "NVIDIA H100 80GB HBM3 | solar_kernels 0.1.0",
        "NVIDIA H200 | solar_kernels 0.1.0",
        "NVIDIA H100 80GB HBM3 | solar_kernels 0.2.0",
    }
    # Each process still sees its own GPU's choice.
    assert tuner(tmp_path, FakeTimings()).choose("swiglu_bwd", 4096, 4096) == "cuda"
    assert tuner(tmp_path, FakeTimings(), device="NVIDIA H200").choose("swiglu_bwd", 4096, 4096) == "triton"


def test_cache_path_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "elsewhere" / "choices.json"
    monkeypatch.setenv(_autotune.CACHE_ENV_VAR, str(path))
    assert _autotune.default_cache_path() == str(path)
    AutoBackend("GPU", "0.1.0", FakeTimings()).choose("rms_norm_bwd", 64, 64)
    assert "GPU | solar_kernels 0.1.0" in json.loads(path.read_text())
    monkeypatch.delenv(_autotune.CACHE_ENV_VAR)
    assert _autotune.default_cache_path().endswith("/.cache/solar_kernels/autotune.json")


def test_unreadable_cache_is_measured_again_and_rewritten(tmp_path):
    (tmp_path / "autotune.json").write_text("{not json")
    timings = FakeTimings()
    assert tuner(tmp_path, timings).choose("rms_norm_fwd", 64, 64) == "cuda"
    assert len(timings.calls) == 2
    assert (
        "choices" in json.loads((tmp_path / "autotune.json").read_text())["NVIDIA H100 80GB HBM3 | solar_kernels 0.1.0"]
    )


def test_nothing_is_measured_while_measuring_is_not_allowed(tmp_path):
    timings = FakeTimings()
    auto = tuner(tmp_path, timings)
    assert auto.choose("rms_norm_fwd", 64, 64, may_measure=False) == "triton"
    assert timings.calls == [] and not (tmp_path / "autotune.json").exists()


def test_named_backends_never_consult_the_table(monkeypatch):
    monkeypatch.setattr(_autotune, "_tuner", lambda device: pytest.fail("the table was consulted"))
    for backend in ("triton", "cuda"):
        assert pick(backend, "rms_norm_fwd", 4, 4, torch.device("cpu")) == backend


class RecordingTuner:
    def __init__(self, answer):
        self.answer, self.asked = answer, []

    def choose(self, kernel, rows, width, may_measure=True):
        self.asked.append((kernel, rows, width))
        return self.answer


@pytest.fixture
def recording(monkeypatch):
    def install(answer):
        recorder = RecordingTuner(answer)
        monkeypatch.setattr(_autotune, "_tuner", lambda device: recorder)
        return recorder

    return install


def _run_every_op_with(backend, device):
    """Forward and backward of each unmoved fused op's custom op with backend "auto" (as backend=None
    resolves on a GPU with the extension), then one launch of each out-variant record on 6 rows of 40."""
    linear_logprobs, rms_norm = (
        importlib.import_module(f"solar_kernels.ops.{name}") for name in ("linear_logprobs", "rms_norm")
    )
    x = torch.randn(3, 7, 123, device=device, requires_grad=True)
    w = torch.randn(123, device=device, requires_grad=True)
    y, _, _ = rms_norm._rms_norm_fwd_op(x, w, None, 1e-5, backend)
    y.sum().backward()
    hidden = torch.randn(10, 16, device=device, requires_grad=True)
    weight = torch.randn(90, 16, device=device)
    labels = torch.randint(0, 90, (10,), device=device)
    logp, _ = linear_logprobs._logprobs_fwd_op(hidden, weight, None, labels, -100, 4, backend)
    logp.sum().backward()
    for kernel in _registry.kernels():
        if kernel.out_variant:
            kernel.launch(backend, *kernel.example(6, 40, torch.float32, device), **kernel.variants[0])


def test_every_launcher_asks_the_table_with_its_rows_and_width(recording, device):
    recorder = recording("triton")
    _run_every_op_with("auto", device)
    assert recorder.asked == [
        ("rms_norm_fwd", 21, 123),
        ("rms_norm_bwd", 21, 123),
        ("logprobs", 4, 90),
        ("logprobs", 4, 90),  # chunks of 4 tokens over V = 90
    ] + [(k.name, 6, 40) for k in _registry.kernels() if k.out_variant]
    assert ("swiglu_fwd", 6, 40) in recorder.asked and ("swiglu_bwd", 6, 40) in recorder.asked
    assert ("rotary", 6, 40) in recorder.asked  # 6 tokens of (1 + 1) heads x 20
    # Every kernel a launcher asks about has a record (its timing), and every record is asked about.
    assert {kernel for kernel, _, _ in recorder.asked} == set(_registry.KERNELS)


@pytest.mark.skipif(_cuda.load_error() is not None, reason="needs the CUDA extension built")
def test_a_cuda_choice_runs_the_cuda_op(recording):
    """The launcher really switches: a "cuda" answer reaches torch.ops.solar_kernels_C (which, given
    CPU tensors, says it runs on CUDA devices only)."""
    rms_norm = importlib.import_module("solar_kernels.ops.rms_norm")
    recording("cuda")
    with pytest.raises(RuntimeError, match="solar_kernels_C::rms_norm_fwd: x is on cpu"):
        rms_norm._rms_norm_fwd_op(torch.randn(2, 8), torch.randn(8), None, 1e-5, "auto")


@pytest.mark.skipif(_cuda.load_error() is not None, reason="needs the CUDA extension built")
def test_a_cuda_choice_runs_the_out_variant_cuda_op(recording):
    """A record's dispatch hands a "cuda" answer to torch.ops.solar_kernels_C with the outputs it
    allocated (the op's checks then say it runs on CUDA devices only)."""
    swiglu = importlib.import_module("solar_kernels.ops.swiglu")
    recording("cuda")
    with pytest.raises(RuntimeError, match="solar_kernels_C::swiglu_fwd: gate is on cpu; the CUDA kernels"):
        swiglu._swiglu_fwd_op(torch.randn(2, 8), torch.randn(2, 8), "auto")
