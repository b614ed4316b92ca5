"""Usage: compute-sanitizer --tool memcheck --error-exitcode 1 python -m tools.cuda_sanitize (from the repository)

A small case of every CUDA C++ op, forward and backward, to run under compute-sanitizer. Each case
runs through the public API with ``backend="cuda"`` (so the backward kernels run too) and through
``torch.ops.solar_kernels_C`` directly (every out-variant record of the kernel registry, against its
Triton launcher) on inputs that start one element into their buffer (the scalar path), at widths that are odd, that fill the vector path exactly, and that overflow the
kernels' register caches (the re-read path). PyTorch's caching allocator serves tensors from large
blocks, where an access past a tensor's end stays inside the block and memcheck cannot see it:
the script turns caching off (PYTORCH_NO_CUDA_MEMORY_CACHING=1) before CUDA starts.

Prints one line per case and exits non-zero when a result is off (a relative error against the
op's *_ref above a loose bound); memcheck itself reports any illegal access.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")

import functools  # noqa: E402

import torch  # noqa: E402

import solar_kernels as sk  # noqa: E402
from solar_kernels import selfcheck  # noqa: E402
from solar_kernels.ops import _registry  # noqa: E402
from tests.helpers import misaligned  # noqa: E402

DEVICE = "cuda"
BOUND = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


# Inputs one element into their buffer: not 16-byte aligned, so the kernels take the scalar path.
shifted = functools.partial(misaligned, device=DEVICE)


rel = selfcheck.rel_err


def through_api(name, dtype, fn, ref, inputs):
    """fn and ref forward and backward on the same leaves; the worst relative error of all results."""
    ours_leaves = [t.detach().clone().requires_grad_() for t in inputs]
    ref_leaves = [t.detach().clone().requires_grad_() for t in inputs]
    ours, expected = fn(*ours_leaves), ref(*ref_leaves)
    ours = list(ours) if isinstance(ours, tuple) else [ours]
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    upstream = [torch.randn_like(o) for o in ours]
    torch.autograd.backward(ours, upstream)
    torch.autograd.backward(expected, upstream)
    errors = [rel(a, b) for a, b in zip(ours, expected)]
    errors += [rel(a.grad, b.grad) for a, b in zip(ours_leaves, ref_leaves)]
    return report(name, dtype, max(errors))


def report(name, dtype, error):
    torch.cuda.synchronize()
    ok = error <= BOUND[dtype]
    print(f"{name:<40}{str(dtype).replace('torch.', ''):<10}{error:10.2e}  {'ok' if ok else 'WRONG'}", flush=True)
    return ok


def registry_cases(dtype) -> bool:
    """Every record of the kernel registry on misaligned example inputs (the scalar path):
    its CUDA op against its Triton launcher, on the outputs and on the inputs it writes in place."""
    ok = True
    for kernel in _registry.kernels():
        for options in kernel.variants:
            written = {}
            for backend in ("cuda", "triton"):
                torch.manual_seed(0)  # the same inputs for both
                inputs = kernel.example(5, 4096, dtype, DEVICE, shifted)
                outputs = kernel.launch(backend, *inputs, **options)
                written[backend] = [t for t in (*outputs, *(inputs[i] for i in kernel.in_place)) if t is not None]
            label = "".join(f" {key}={value}" for key, value in options.items())
            error = max(rel(a, b) for a, b in zip(written["cuda"], written["triton"]))
            ok &= report(f"{kernel.name} misaligned{label}", dtype, error)
    return ok


def cases(dtype):
    ops = torch.ops.solar_kernels_C
    ok = True
    for width in (123, 4096, 65536):  # odd (scalar), vector, past the register cache
        rows = 3 if width == 65536 else 5
        x, r, w = rand(rows, width, dtype=dtype), rand(rows, width, dtype=dtype), rand(width, dtype=dtype)
        ok &= through_api(
            f"rms_norm d={width}",
            dtype,
            lambda x, w: sk.rms_norm(x, w, 1e-5, backend="cuda"),
            lambda x, w: sk.rms_norm_ref(x, w, 1e-5),
            [x, w],
        )
        ok &= through_api(
            f"rms_norm+residual d={width}",
            dtype,
            lambda x, r, w: sk.rms_norm(x, w, 1e-5, residual=r, backend="cuda"),
            lambda x, r, w: sk.rms_norm_ref(x, w, 1e-5, r),
            [x, r, w],
        )

    for head_dim in (6, 128):
        q, k = rand(2, 4, 9, head_dim, dtype=dtype), rand(2, 2, 9, head_dim, dtype=dtype)
        cos, sin = rand(2, 9, head_dim, dtype=torch.float32), rand(2, 9, head_dim, dtype=torch.float32)
        ok &= through_api(
            f"apply_rotary D={head_dim}",
            dtype,
            lambda q, k, cos=cos, sin=sin: sk.apply_rotary(q, k, cos, sin, backend="cuda"),
            lambda q, k, cos=cos, sin=sin: sk.apply_rotary_ref(q, k, cos, sin),
            [q, k],
        )
    q_bthd = rand(2, 9, 4, 128, dtype=dtype)
    ok &= through_api(
        "apply_rotary [B, T, H, D] view",
        dtype,
        lambda q, k, cos=cos, sin=sin: sk.apply_rotary(q, k, cos, sin, backend="cuda"),
        lambda q, k, cos=cos, sin=sin: sk.apply_rotary_ref(q, k, cos, sin),
        [q_bthd.transpose(1, 2), k],
    )

    for width in (123, 14336):
        gate, up = rand(5, width, dtype=dtype, scale=3), rand(5, width, dtype=dtype)
        ok &= through_api(
            f"swiglu I={width}", dtype, lambda g, u: sk.swiglu(g, u, backend="cuda"), sk.swiglu_ref, [gate, up]
        )
    ok &= registry_cases(dtype)

    for vocab in (4097, 32000):
        hidden, weight = rand(3, 7, 64, dtype=dtype), rand(vocab, 64, dtype=dtype, scale=0.2)
        labels = torch.randint(0, vocab, (3, 7), device=DEVICE)
        labels[0, :3] = -100
        for name, op, ref in (
            ("linear_logprobs", sk.linear_logprobs, sk.linear_logprobs_ref),
            ("linear_cross_entropy", sk.linear_cross_entropy, sk.linear_cross_entropy_ref),
        ):
            ok &= through_api(
                f"{name} V={vocab}",
                dtype,
                lambda h, w, labels=labels, op=op: op(h, w, labels, chunk_size=8, backend="cuda"),
                lambda h, w, labels=labels, ref=ref: ref(h, w, labels),
                [hidden, weight],
            )
    logits = shifted(6, 1001, dtype=dtype)
    labels = torch.tensor([0, -100, 1000, 1001, 5, -3], device=DEVICE)  # two out of range: NaN rows
    logp, lse = torch.empty(6, device=DEVICE), torch.empty(6, device=DEVICE)
    ops.logprobs_(logits, labels, logp, lse, torch.ones(6, device=DEVICE), -100, True, True)
    nan_rows = torch.isnan(logp).nonzero().flatten().tolist()
    ok &= report("logprobs_ misaligned (NaN rows 3, 5)", dtype, 0.0 if nan_rows == [3, 5] else float("inf"))
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from solar_kernels._backend import unavailable_reason

    reason = unavailable_reason("cuda", torch.device(DEVICE))
    if reason is not None:
        print(f"backend 'cuda' does not run here: {reason}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    ok = True
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        ok &= cases(dtype)
    print("all CUDA ops ran clean" if ok else "some CUDA op gave a wrong result")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
