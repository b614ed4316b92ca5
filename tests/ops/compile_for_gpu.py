"""Compile every Triton kernel for real GPU targets, on a machine without a GPU.

Triton's interpreter runs kernels as Python and so accepts code the GPU compiler rejects (types,
bf16 arithmetic, unsupported ops). This script drives each host launcher with CPU tensors, catches
the launch instead of running it, and compiles the kernel with exactly those arguments to PTX and
cubin for each target (``triton.compile`` with an explicit ``GPUTarget`` needs no driver).

Run it without TRITON_INTERPRET (``tests/ops/test_gpu_compile.py`` does, in a subprocess):
    python tests/ops/compile_for_gpu.py 90 80
Prints one line per compiled kernel; exits non-zero on the first compile error.
"""

import importlib
import os
import subprocess
import sys
import tempfile
import time

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET: compiled kernels are needed"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64", torch.int32: "i32"}
OPTIONS = ("num_warps", "num_stages")


class Capture:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.fn, args, kwargs))


def signature(fn, args, kwargs):
    names = fn.arg_names
    values = dict(zip(names, args), **{k: v for k, v in kwargs.items() if k not in OPTIONS})
    sig, constexprs = {}, {}
    for param in fn.params:
        value = values[param.name]
        if param.is_constexpr:
            sig[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            sig[param.name] = "*" + TYPES[value.dtype]
        elif isinstance(value, bool):
            sig[param.name] = "i1"
        elif isinstance(value, int):
            sig[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[param.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {param.name}={value!r}")
    return sig, constexprs


def launches():
    """Drive every launcher on SOLAR-like widths for each dtype; yield the captured launches."""
    modules = {name: importlib.import_module(f"solar_kernels.ops.{name}") for name in
               ("rms_norm", "swiglu", "rotary", "linear_logprobs")}
    calls = []
    for module in modules.values():
        for attr in dir(module):
            obj = getattr(module, attr)
            if isinstance(obj, triton.runtime.JITFunction) and attr.endswith("_kernel"):
                setattr(module, attr, Capture(obj, calls))
    rms, swi, rot, lp = (modules[n] for n in ("rms_norm", "swiglu", "rotary", "linear_logprobs"))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for width in (4096, 65536):
            x = torch.randn(8, width, dtype=dtype)
            w = torch.randn(width, dtype=dtype)
            rstd = torch.rand(8)
            for residual in (None, torch.randn_like(x)):
                rms._rms_norm_fwd(x, w, residual, 1e-5)
                rms._rms_norm_bwd(x, x, w, rstd, residual)
        gate = torch.randn(8, 14336, dtype=dtype)
        swi._swiglu_fwd(gate, gate)
        swi._swiglu_bwd(gate, gate, gate)
        q, k = torch.randn(1, 32, 16, 128, dtype=dtype), torch.randn(1, 8, 16, 128, dtype=dtype)
        cos = torch.randn(16, 128, dtype=dtype)
        for backward in (False, True):
            rot._rotary(q, k, cos, cos, backward)
        hidden, weight = torch.randn(8, 64, dtype=dtype), torch.randn(32000, 64, dtype=dtype)
        labels = torch.randint(0, 32000, (8,))
        logp, lse, _ = lp._chunked_pass(hidden, weight, None, labels, -100, 4)
        lp._chunked_pass(hidden, weight, None, labels, -100, 4, lse=lse, grad=logp)
        lp._chunked_pass(hidden, weight, None, labels, -100, 4, grad=logp)
    seen = set()
    for fn, args, kwargs in calls:
        sig, constexprs = signature(fn, args, kwargs)
        key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())))
        if key not in seen:
            seen.add(key)
            yield fn, sig, constexprs, {k: kwargs[k] for k in OPTIONS if k in kwargs}


def resource_usage(cubin: bytes) -> str:
    """Registers and stack (spills) per thread, from the cuobjdump that ships with Triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return "resource usage unknown (no cuobjdump)"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    fields = [line.strip() for line in out.splitlines() if "REG:" in line]
    return " ".join(fields[0].split()[:2]) if fields else "resource usage unknown"


def main(archs):
    count, start = 0, time.time()
    for fn, sig, constexprs, options in launches():
        for arch in archs:
            compiled = triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", arch, 32), options=options)
            assert compiled.asm.get("cubin"), f"{fn.__name__}: no cubin for sm_{arch}"
            count += 1
            element = sorted({t for t in sig.values() if t.startswith("*")})[0]
            usage = resource_usage(compiled.asm["cubin"])
            print(f"sm_{arch} {fn.__name__} {element} {constexprs} {options}: {usage}")
    print(f"compiled {count} kernel variants in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [90])
