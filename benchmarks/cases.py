"""The benchmarked ops: shapes, minimum bytes and FLOPs, and every contender for each.

Minimum bytes count each input read once and each output written once (b = bytes per element):

| op (mode) | minimum bytes |
|---|---|
| rms_norm fwd | x, w read; y written: 2·N·d·b + d·b |
| rms_norm bwd | dy, x, w read; dx, dw written: 3·N·d·b + 2·d·b |
| rms_norm+residual fwd | x, r, w read; y, h written: 4·N·d·b + d·b |
| rms_norm+residual bwd | dy, dh, h, w read; dx written once (dx = dr), dw: 4·N·d·b + 2·d·b |
| apply_rotary fwd, bwd | q, k, cos, sin read; q', k' written: 2·T·(Hq+Hkv)·D·b + 2·T·D·b |
| swiglu fwd | gate, up read; y written: 3·N·I·b |
| swiglu bwd | dy, gate, up read; dgate, dup written: 5·N·I·b |

The ops of the kernel registry (solar_kernels/ops/_registry.py; swiglu and apply_rotary so far) get
their case from their records: rows of the op's model width (``Op.model_width`` of the
``solar-10.7b`` preset, ``tiny`` on the CPU), minimum bytes from the outputs the records allocate
(every input and output of the forward kernel, and of the backward kernel; rotary's backward is its
forward kernel), and as contenders the reference, it compiled, each backend and Liger's twin.

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
    bytes: dict[str, int] = field(default_factory=dict)   # per mode, memory-bound ops
    flops: dict[str, int] = field(default_factory=dict)   # per mode, matmul-bound ops
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


def _rms_norm_case(tokens, d, dtype, device, residual, contenders):
    eps = 1e-5

    def make():
        x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
        w = (1 + 0.1 * torch.randn(d, device=device, dtype=dtype)).requires_grad_()
        inputs = {"x": x, "w": w}
        if residual:
            inputs["r"] = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
        return inputs

    def ours(backend):
        if residual:
            return lambda i: sk.rms_norm(i["x"], i["w"], eps, residual=i["r"], backend=backend)
        return lambda i: sk.rms_norm(i["x"], i["w"], eps, backend=backend)

    ref = (lambda x, w, r: sk.rms_norm_ref(x, w, eps, r)) if residual else (lambda x, w: sk.rms_norm_ref(x, w, eps))
    compiled = _compiled(ref, device)
    run = {
        "torch": (lambda i: ref(i["x"], i["w"], i["r"])) if residual else (lambda i: ref(i["x"], i["w"])),
        "torch_compile": (lambda i: compiled(i["x"], i["w"], i["r"])) if residual else (lambda i: compiled(i["x"], i["w"])),
        "triton": ours("triton"),
        "cuda": ours("cuda"),
    }
    if "liger" in contenders:
        from liger_kernel.transformers.functional import liger_fused_add_rms_norm, liger_rms_norm

        run["liger"] = ((lambda i: liger_fused_add_rms_norm(i["x"], i["r"], i["w"], eps)) if residual
                        else (lambda i: liger_rms_norm(i["x"], i["w"], eps)))
    if "flash_attn" in contenders:
        from flash_attn.ops.triton.layer_norm import rms_norm_fn

        run["flash_attn"] = ((lambda i: rms_norm_fn(i["x"], i["w"], None, residual=i["r"], eps=eps,
                                                    prenorm=True)) if residual
                             else (lambda i: rms_norm_fn(i["x"], i["w"], None, eps=eps)))
    b = torch.empty((), dtype=dtype).element_size()
    nd = tokens * d * b
    fwd, bwd = (4 * nd + d * b, 4 * nd + 2 * d * b) if residual else (2 * nd + d * b, 3 * nd + 2 * d * b)
    return Case("rms_norm+residual" if residual else "rms_norm", dtype, {"tokens": tokens, "d": d}, make,
                {k: v for k, v in run.items() if k in contenders},
                bytes={"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd},
                grad_inputs=("x", "w", "r") if residual else ("x", "w"))


def _liger_swiglu(inputs):
    from liger_kernel.transformers.functional import liger_swiglu

    return liger_swiglu(inputs["gate"], inputs["up"])


def _liger_rope(inputs):
    from liger_kernel.transformers.functional import liger_rope

    cos, sin = (t if t.dim() == 3 else t[None] for t in (inputs["cos"], inputs["sin"]))  # Liger takes [1|B, T, D]
    return liger_rope(inputs["q"], inputs["k"], cos, sin)


# Liger-Kernel's twin of a registry op, where it has one.
_LIGER = {"swiglu": _liger_swiglu, "apply_rotary": _liger_rope}


def _minimum_bytes(kernel: _registry.Kernel, rows: int, width: int, dtype: torch.dtype) -> int:
    """Each input of one launch read once and each output written once (outputs as the record allocates them)."""
    inputs = kernel.example(rows, width, dtype, "meta", torch.empty)
    return sum(t.numel() * t.element_size() for t in (*inputs, *kernel.allocate(*inputs)))


def _registry_case(op: _registry.Op, tokens, cpu, dtype, device, contenders):
    width = op.model_width(PRESETS["tiny" if cpu else "solar-10.7b"])
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
    if "liger" in contenders and op.name in _LIGER:
        run["liger"] = _LIGER[op.name]
    fwd, bwd = (_minimum_bytes(kernel, tokens, width, dtype) for kernel in (op.kernels[0], op.kernels[-1]))
    return Case(op.name, dtype, {"tokens": tokens, op.width.removesuffix("_size"): width}, make,
                {k: v for k, v in run.items() if k in contenders},
                bytes={"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}, grad_inputs=tuple(grad_names))


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
    return Case(op, dtype, {"tokens": tokens, "d": d, "vocab": vocab}, make,
                {k: v for k, v in run.items() if k in contenders or k == "matmul"},
                flops={"fwd": flops, "bwd": 2 * flops, "fwd+bwd": 3 * flops}, grad_inputs=("hidden", "weight"))


# The op files not moved onto the kernel registry yet, by family: their hand-written cases.
_UNMOVED_CASES = {
    "rms_norm": lambda count, shape, dtype, device, contenders: [
        _rms_norm_case(count, shape["d"], dtype, device, residual, contenders) for residual in (False, True)],
}
# Op files whose public ops are more than their kernel (the log-prob row step inside chunked
# matmuls): the ops are timed whole, against the matmuls they must do.
_COMPOSITE_CASES = {
    "linear_logprobs": lambda count, shape, dtype, device, contenders: [
        _logprob_case(op, count, shape, dtype, device, contenders)
        for op in ("linear_cross_entropy", "linear_logprobs")],
}


def build_cases(device: torch.device, dtypes, *, cpu: bool, ops: list[str] | None = None,
                sweep: bool = True, tokens: list[int] | None = None) -> list[Case]:
    everyone = available_contenders(device)
    without_compile = [c for c in everyone if c != "torch_compile"]
    shape = TINY if cpu else SOLAR
    token_counts = tokens or (CPU_TOKENS if cpu else GPU_TOKENS)
    cases: list[Case] = []
    for dtype in dtypes:
        for count in token_counts:
            contenders = everyone if cpu or count == COMPILE_TOKENS else without_compile
            for family in _registry.families():  # every op file with kernels, moved or not
                recorded = [op for op in _registry.ops() if op.kernels[0].family == family]
                if recorded:
                    cases += [_registry_case(op, count, cpu, dtype, device, contenders) for op in recorded]
                elif family in _UNMOVED_CASES or family in _COMPOSITE_CASES:
                    cases += {**_UNMOVED_CASES, **_COMPOSITE_CASES}[family](count, shape, dtype, device, contenders)
                else:
                    raise ValueError(f"benchmarks: the kernels of {family} have neither an Op record nor a case here")
        if sweep:
            widths = (64, 4096) if cpu else RMS_SWEEP
            elements = 64 * 64 if cpu else SWEEP_ELEMENTS
            for width in widths:
                case = _rms_norm_case(max(1, elements // width), width, dtype, device, False,
                                      everyone if cpu else without_compile)
                case.op = "rms_norm_sweep"
                cases.append(case)
    return [c for c in cases if ops is None or c.op in ops]
