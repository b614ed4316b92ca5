"""The benchmarked ops: shapes, minimum bytes and FLOPs, and every contender for each.

Minimum bytes count each input read once and each output written once (b = bytes per element):

| op (mode) | minimum bytes |
|---|---|
| rms_norm fwd | x, w read; y, rstd written: 2·N·d·b + d·b + 4·N |
| rms_norm bwd | dy, x, w, rstd read; dx, dw written: 3·N·d·b + 2·d·b + 4·N |
| rms_norm+residual fwd | x, r, w read; y, h written: 4·N·d·b + d·b |
| rms_norm+residual bwd | dy, dh, h, w read; dx written once (dx = dr), dw: 4·N·d·b + 2·d·b |
| apply_rotary fwd, bwd | q, k, cos, sin read; q', k' written: 2·T·(Hq+Hkv)·D·b + 2·T·D·b |
| swiglu fwd | gate, up read; y written: 3·N·I·b |
| swiglu bwd | dy, gate, up read; dgate, dup written: 5·N·I·b |

The ops of the kernel registry (solar_kernels/ops/_registry.py: rms_norm, apply_rotary, swiglu) get
their case from their records: rows of the op's model width (``Op.model_width`` of the
``solar-10.7b`` preset, ``tiny`` on the CPU), minimum bytes from the outputs the records allocate
(every input and output of the forward kernel, and of the backward kernel; rotary's backward is its
forward kernel), and as contenders the reference, it compiled, each backend and the other
libraries' twins (``_TWINS``). RMSNorm's fused residual add is a variant case of its own
(``_VARIANT_CASES``), and its width sweep is its registry case at each width of ``RMS_SWEEP``.

(fwd+bwd is the sum.) The log-prob ops are matmul-bound: 2·N·d·V FLOPs for the logits, 4·N·d·V
more for dhidden and dweight; the table counts 2·N·d·V (fwd) and 6·N·d·V (fwd+bwd), and the
``matmul`` contender times the GEMMs each op does with ``torch.matmul``: the floor the fused op is
held to (target: at most 1.15x its time). That is three GEMMs for linear_cross_entropy and four for
linear_logprobs, whose backward recomputes the logits by design.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import solar_kernels as sk
from solar_kernels._backend import unavailable_reason
from solar_kernels.model.config import PRESETS
from solar_kernels.ops import _registry

SOLAR = {"d": 4096, "vocab": 32000}
RMS_EPS = 1e-6  # rms_norm's default, for every contender
TINY = {"d": 64, "vocab": 512}
GPU_TOKENS = (16384, 32768, 4096)  # the size the targets are set at first, should a run be cut short
# torch.compile spends 10-30 s per op and shape compiling; on the GPU it is timed at this size only.
COMPILE_TOKENS = 16384
CPU_TOKENS = (64,)
RMS_SWEEP = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
SWEEP_ELEMENTS = 1 << 26  # rows x width for the width sweep: 128 MB of bf16, well beyond L2


@dataclass
class Case:
    op: str
    dtype: torch.dtype
    shape: dict[str, int]
    make_inputs: Callable[[], dict[str, torch.Tensor]]
    # contender -> fn(inputs); the "matmul" floor takes (inputs, mode) and needs no autograd
    contenders: dict[str, Callable[..., object]]
    bytes: dict[str, int] = field(default_factory=dict)  # per mode, memory-bound ops
    flops: dict[str, int] = field(default_factory=dict)  # per mode, matmul-bound ops
    grad_inputs: tuple = ()  # names of the inputs whose gradients the backward computes

    @property
    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.shape.items())


def available_contenders(device: torch.device) -> list[str]:
    names = ["torch", "torch_compile"]
    for backend in ("triton", "cuda"):
        if unavailable_reason(backend, device) is None:
            names.append(backend)
    if device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        names.append("liger")
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        names.append("flash_attn")
    return names


def _compiled(fn, device):
    # The backward-only timing replays one graph (retain_graph=True), which compiled backwards
    # refuse when they donate buffers; donation changes no timing here.
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    # On the CPU, inductor would spend minutes compiling tiny graphs; aot_eager checks the tracing.
    return torch.compile(fn, backend="inductor" if device.type == "cuda" else "aot_eager")


def _liger_rms_norm(inputs):
    from liger_kernel.transformers.functional import liger_fused_add_rms_norm, liger_rms_norm

    if "residual" in inputs:
        return liger_fused_add_rms_norm(inputs["x"], inputs["residual"], inputs["weight"], RMS_EPS)
    return liger_rms_norm(inputs["x"], inputs["weight"], RMS_EPS)


def _flash_attn_rms_norm(inputs):
    from flash_attn.ops.triton.layer_norm import rms_norm_fn

    if "residual" in inputs:
        return rms_norm_fn(inputs["x"], inputs["weight"], None, residual=inputs["residual"], eps=RMS_EPS, prenorm=True)
    return rms_norm_fn(inputs["x"], inputs["weight"], None, eps=RMS_EPS)


def _liger_swiglu(inputs):
    from liger_kernel.transformers.functional import liger_swiglu

    return liger_swiglu(inputs["gate"], inputs["up"])


def _liger_rope(inputs):
    from liger_kernel.transformers.functional import liger_rope

    cos, sin = (t if t.dim() == 3 else t[None] for t in (inputs["cos"], inputs["sin"]))  # Liger takes [1|B, T, D]
    return liger_rope(inputs["q"], inputs["k"], cos, sin)


# Other libraries' twins of an op, by contender (run where the library is installed), on the inputs
# by the reference's argument names.
_TWINS = {
    "rms_norm": {"liger": _liger_rms_norm, "flash_attn": _flash_attn_rms_norm},
    "swiglu": {"liger": _liger_swiglu},
    "apply_rotary": {"liger": _liger_rope},
}


def _rms_norm_residual_case(tokens, d, dtype, device, contenders):
    """RMSNorm with the fused residual add (a variant its record's example does not cover)."""

    def make():
        return {
            "x": torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True),
            "weight": (1 + 0.1 * torch.randn(d, device=device, dtype=dtype)).requires_grad_(),
            "residual": torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True),
        }

    def ref(x, weight, residual):
        return sk.rms_norm_ref(x, weight, RMS_EPS, residual)

    compiled = _compiled(ref, device)
    run = {
        "torch": lambda i: ref(i["x"], i["weight"], i["residual"]),
        "torch_compile": lambda i: compiled(i["x"], i["weight"], i["residual"]),
        **{
            backend: (
                lambda i, backend=backend: sk.rms_norm(
                    i["x"], i["weight"], RMS_EPS, residual=i["residual"], backend=backend
                )
            )
            for backend in ("triton", "cuda")
        },
        **_TWINS["rms_norm"],
    }
    b = torch.empty((), dtype=dtype).element_size()
    nd = tokens * d * b
    fwd, bwd = 4 * nd + d * b, 4 * nd + 2 * d * b
    return Case(
        "rms_norm+residual",
        dtype,
        {"tokens": tokens, "d": d},
        make,
        {k: v for k, v in run.items() if k in contenders},
        bytes={"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd},
        grad_inputs=("x", "weight", "residual"),
    )


def _minimum_bytes(kernel: _registry.Kernel, rows: int, width: int, dtype: torch.dtype) -> int:
    """Each input of one launch read once and each output written once (outputs as the record allocates
    them; an optional one the example leaves out, None, moves nothing)."""
    inputs = kernel.example(rows, width, dtype, "meta", torch.empty)
    return sum(t.numel() * t.element_size() for t in (*inputs, *kernel.allocate(*inputs)) if t is not None)


def _registry_case(op: _registry.Op, tokens, cpu, dtype, device, contenders, width: int | None = None):
    """The case of a registry op: ``tokens`` rows of its model width (or of ``width``)."""
    width = width or op.model_width(PRESETS["tiny" if cpu else "solar-10.7b"])
    names = list(inspect.signature(op.ref).parameters)[: len(op.example(1, 1, dtype, "meta", torch.empty))]
    grad_names = names[: len(op.split(names)[0])]

    def make():
        inputs = dict(zip(names, op.example(tokens, width, dtype, device)))
        return {n: t.requires_grad_() if n in grad_names else t for n, t in inputs.items()}

    compiled = _compiled(op.ref, device)
    run = {
        "torch": lambda i: op.ref(*(i[n] for n in names)),
        "torch_compile": lambda i: compiled(*(i[n] for n in names)),
        "triton": lambda i: op.fn(*(i[n] for n in names), backend="triton"),
        "cuda": lambda i: op.fn(*(i[n] for n in names), backend="cuda"),
    }
    run.update(_TWINS.get(op.name, {}))
    fwd, bwd = (_minimum_bytes(kernel, tokens, width, dtype) for kernel in (op.kernels[0], op.kernels[-1]))
    return Case(
        op.name,
        dtype,
        {"tokens": tokens, op.width.removesuffix("_size"): width},
        make,
        {k: v for k, v in run.items() if k in contenders},
        bytes={"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd},
        grad_inputs=tuple(grad_names),
    )


def _logprob_case(op, tokens, shape, dtype, device, contenders):
    d, vocab = shape["d"], shape["vocab"]

    def make():
        labels = torch.randint(0, vocab, (tokens,), device=device)
        labels[: tokens // 4] = -100  # a prompt share, as in SFT/DPO batches
        return {
            "hidden": torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True),
            "weight": (torch.randn(vocab, d, device=device, dtype=dtype) / d**0.5).requires_grad_(),
            "labels": labels,
        }

    if op == "linear_cross_entropy":

        def ref(h, w, y):
            return sk.linear_cross_entropy_ref(h, w, y)

        def ours(backend):
            return lambda i: sk.linear_cross_entropy(i["hidden"], i["weight"], i["labels"], backend=backend)
    else:

        def ref(h, w, y):
            return sk.linear_logprobs_ref(h, w, y)

        def ours(backend):
            return lambda i: sk.linear_logprobs(i["hidden"], i["weight"], i["labels"], backend=backend)

    def matmuls(i, mode):
        """The GEMMs the op must do (takes the mode): the logits, and dhidden and dweight from a
        logits-sized gradient; the log-prob ops' backward also recomputes the logits (by design:
        nothing logits-sized is kept between forward and backward), linear_cross_entropy's does not."""
        h, w = i["hidden"].detach(), i["weight"].detach()
        if mode == "fwd":
            return h @ w.t()
        grad_logits = i.setdefault("_grad_logits", torch.randn(h.shape[0], w.shape[0], device=h.device, dtype=h.dtype))
        backward = (grad_logits @ w, grad_logits.t() @ h)
        if op != "linear_cross_entropy":
            backward += (h @ w.t(),)
        return backward if mode == "bwd" else (h @ w.t(), *backward)

    compiled = _compiled(ref, device)
    run = {
        "torch": lambda i: ref(i["hidden"], i["weight"], i["labels"]),
        "torch_compile": lambda i: compiled(i["hidden"], i["weight"], i["labels"]),
        "triton": ours("triton"),
        "cuda": ours("cuda"),
        "matmul": matmuls,
    }
    if "liger" in contenders and op == "linear_cross_entropy":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        run["liger"] = lambda i: liger_fused_linear_cross_entropy(i["hidden"], i["weight"], i["labels"])
    flops = 2 * tokens * d * vocab
    return Case(
        op,
        dtype,
        {"tokens": tokens, "d": d, "vocab": vocab},
        make,
        {k: v for k, v in run.items() if k in contenders or k == "matmul"},
        flops={"fwd": flops, "bwd": 2 * flops, "fwd+bwd": 3 * flops},
        grad_inputs=("hidden", "weight"),
    )


# Variants of a registry op that its record's example does not cover, by family: timed as well.
_VARIANT_CASES = {
    "rms_norm": lambda count, shape, dtype, device, contenders: [
        _rms_norm_residual_case(count, shape["d"], dtype, device, contenders)
    ],
}
# Op files whose public ops are more than their kernel (the log-prob row step inside chunked
# matmuls): the ops are timed whole, against the matmuls they must do.
_COMPOSITE_CASES = {
    "linear_logprobs": lambda count, shape, dtype, device, contenders: [
        _logprob_case(op, count, shape, dtype, device, contenders) for op in ("linear_cross_entropy", "linear_logprobs")
    ],
}


def build_cases(
    device: torch.device,
    dtypes,
    *,
    cpu: bool,
    ops: list[str] | None = None,
    sweep: bool = True,
    tokens: list[int] | None = None,
) -> list[Case]:
    everyone = available_contenders(device)
    without_compile = [c for c in everyone if c != "torch_compile"]
    shape = TINY if cpu else SOLAR
    token_counts = tokens or (CPU_TOKENS if cpu else GPU_TOKENS)
    cases: list[Case] = []
    for dtype in dtypes:
        for count in token_counts:
            contenders = everyone if cpu or count == COMPILE_TOKENS else without_compile
            for family in _registry.families():  # every op file with kernels
                recorded = [op for op in _registry.ops() if op.kernels[0].family == family]
                if recorded:
                    cases += [_registry_case(op, count, cpu, dtype, device, contenders) for op in recorded]
                    if family in _VARIANT_CASES:
                        cases += _VARIANT_CASES[family](count, shape, dtype, device, contenders)
                elif family in _COMPOSITE_CASES:
                    cases += _COMPOSITE_CASES[family](count, shape, dtype, device, contenders)
                else:
                    raise ValueError(f"benchmarks: the kernels of {family} have neither an Op record nor a case here")
        if sweep:
            widths = (64, 4096) if cpu else RMS_SWEEP
            elements = 64 * 64 if cpu else SWEEP_ELEMENTS
            rms_norm = _registry.OPS["rms_norm"]
            for width in widths:
                case = _registry_case(
                    rms_norm,
                    max(1, elements // width),
                    cpu,
                    dtype,
                    device,
                    everyone if cpu else without_compile,
                    width=width,
                )
                case.op = "rms_norm_sweep"
                cases.append(case)
    return [c for c in cases if ops is None or c.op in ops]
