"""Kernel self-check: every op on every backend that runs here, against float64.

    python -m solar_kernels.selfcheck [--device cuda] [--dtype bf16]

For each op, backend and dtype it draws fresh random inputs, runs forward and backward, and
prints ``||out - exact|| / ||exact||`` for the output and each gradient, where ``exact`` is the
op's ``*_ref`` evaluated on float64 copies. On a CPU the Triton backend runs only with
``TRITON_INTERPRET=1`` (``make demo`` sets it). Exits non-zero when an error exceeds the
loose bound of its dtype, so it also works as a smoke test on a new machine.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import solar_kernels as sk
from solar_kernels._backend import BACKENDS, unavailable_reason
from solar_kernels.checkpoint import SHORT_DTYPE_NAMES
from solar_kernels.model.config import PRESETS
from solar_kernels.ops import _registry

DTYPES = {short: dtype for dtype, short in SHORT_DTYPE_NAMES.items()}  # "fp32": torch.float32, ...
# Loose bounds for a smoke test; the test suite holds the kernels to eager torch's own error.
BOUNDS = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _cases(device, dtype):
    """(name, inputs needing grad, op(backend, *inputs), reference(*inputs)) per op: the ops of the
    kernel registry from their records (4 rows of the op's width in SOLAR 10.7B), the others by hand."""

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    labels = torch.randint(0, 1000, (2, 9), device=device)
    labels[:, :3] = -100
    recorded = []
    for op in _registry.ops():
        # the inputs that take gradients are the leaves; the rest (rotary's cos/sin) are constants
        leaves, constants = op.split(op.example(4, op.model_width(PRESETS["solar-10.7b"]), dtype, device))
        recorded.append(
            (
                op.name,
                leaves,
                lambda b, *inputs, op=op, rest=constants: op.fn(*inputs, *rest, backend=b),
                lambda *inputs, op=op, rest=constants: op.ref(*inputs, *rest),
            )
        )
    return recorded + [
        (
            "linear_logprobs",
            (rand(2, 9, 256), rand(1000, 256, scale=0.1)),
            lambda b, h, w: sk.linear_logprobs(h, w, labels, backend=b),
            lambda h, w: sk.linear_logprobs_ref(h, w, labels).to(h.dtype),
        ),
        (
            "linear_cross_entropy",
            (rand(2, 9, 256), rand(1000, 256, scale=0.1)),
            lambda b, h, w: sk.linear_cross_entropy(h, w, labels, backend=b),
            lambda h, w: sk.linear_cross_entropy_ref(h, w, labels).to(h.dtype),
        ),
    ]


def _outputs(result):
    return list(result) if isinstance(result, (tuple, list)) else [result]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (the absolute error ||a - b|| where b is all zero)."""
    a, b = a.detach().double(), b.detach().double()
    scale = b.norm().item()
    return (a - b).norm().item() / scale if scale else (a - b).norm().item()


def check(device: torch.device, dtypes, backends):
    rows, failed = [], False
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for name, inputs, op, ref in _cases(device, dtype):
            exact_inputs = [t.detach().double().requires_grad_() for t in inputs]
            exact = _outputs(ref(*exact_inputs))
            upstream = [torch.randn_like(o) for o in exact]
            exact_grads = torch.autograd.grad(exact, exact_inputs, upstream)
            for backend in backends:
                leaves = [t.detach().clone().requires_grad_() for t in inputs]
                start = time.perf_counter()
                outs = _outputs(op(backend, *leaves))
                grads = torch.autograd.grad(outs, leaves, [u.to(o.dtype) for u, o in zip(upstream, outs)])
                seconds = time.perf_counter() - start
                errors = [rel_err(o, e) for o, e in zip([*outs, *grads], [*exact, *exact_grads])]
                # NaN compares False with everything: max() would let a NaN that is not first pass.
                ok = all(error <= BOUNDS[dtype] for error in errors)
                failed |= not ok
                rows.append((name, backend, dtype_name, errors[0], max(errors[len(outs) :]), seconds, ok))
    return rows, failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable; default all")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    backends = [b for b in BACKENDS if unavailable_reason(b, device) is None]
    skipped = {b: unavailable_reason(b, device) for b in BACKENDS if b not in backends}
    torch.manual_seed(int(time.time()))
    rows, failed = check(device, args.dtype or list(DTYPES), backends)
    print(f"solar_kernels {sk.__version__} self-check on {device} (torch {torch.__version__})")
    print(f"{'op':<22}{'backend':<8}{'dtype':<6}{'fwd err':>10}{'grad err':>10}{'seconds':>9}  ok")
    for name, backend, dtype, fwd, grad, seconds, ok in rows:
        print(f"{name:<22}{backend:<8}{dtype:<6}{fwd:>10.2e}{grad:>10.2e}{seconds:>9.3f}  {'yes' if ok else 'NO'}")
    for backend, reason in skipped.items():
        print(f"backend {backend!r} not run: {reason}")
    print("errors are ||result - float64|| / ||float64|| over the output and the worst gradient")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
