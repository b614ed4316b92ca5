"""One record per kernel: what dispatch, the fakes, ``auto``, the tests, the benchmarks and the
GPU-compile tool know about it, written once.

Adding a kernel
---------------
An elementwise kernel over rows [N, width] (SwiGLU is the worked example) touches four files, plus
its two export lines in ``solar_kernels/ops/__init__.py`` (the import and ``__all__``) when it is
public:

1. ``solar_kernels/ops/<op>.py``, in the order of STYLE.md: the ``<op>_ref`` reference, the
   ``@triton.jit`` kernels, one out-variant Triton launcher per kernel (``launcher(*inputs,
   *outputs)``: it writes the outputs it is given, [N, width] row views), the records::

       FWD = register(elementwise("<op>_fwd", "<op>", _<op>_fwd_triton, inputs=2, outputs=1))
       BWD = register(elementwise("<op>_bwd", "<op>", _<op>_bwd_triton, inputs=3, outputs=2))

   then the ``torch.library`` custom ops (``@custom_op("<op>_fwd", fake=...)``), whose real
   implementation is ``FWD.launch(backend, *rows)`` and whose fake is ``FWD.allocate(*inputs)``
   (the contract), the public function (its
   argument checks, one-line errors, before any work) and ``register_op(Op(name, fn, ref, (FWD,
   BWD), width="intermediate_size"))``, which lets the self-check, the benchmarks, the GPU-compile
   tool and the emulated-CUDA test run it (``width`` names the ModelConfig field a row is as wide as).
2. ``csrc/<op>.cu``: the CUDA kernels and one ``SOLAR_ROWS_LAUNCHER(solar_<op>_fwd)`` per record,
   reading a ``Rows`` block (csrc/launch.h) whose tensors come in the record's order, inputs then
   outputs. setup.py builds every ``.cu`` in csrc/.
3. ``csrc/torch_bindings.cpp``: per record, the launcher's declaration, its schema (``"<op>_fwd(
   Tensor gate, Tensor up, Tensor(a!) y) -> ()"``: the only place it is written) and
   ``SOLAR_ROWS_OP(m, <op>_fwd)``. The host side (csrc/rows_host.cpp) is shared: it checks what
   protects memory (device, dtype, shape, unit column stride, alignment) and launches.
4. ``tests/ops/test_<op>.py``: the op against its reference in float64 (tests/tolerances.py).

What then follows from the record with no further edit: the ``auto`` backend's choice per shape
class (``pick`` with ``rows_width``, timed on ``example`` inputs), the fake of the CUDA op (an
out-variant needs none), the CPU emulation of the CUDA kernel (tests/ops/test_cuda_emulated.py
binds every ``SOLAR_ROWS_LAUNCHER`` by name and checks every registry op against its reference), the
schema and registration checks of the built extension (tests/ops/test_cuda_build.py), the
compiled-code report (tools/compile_for_gpu.py drives ``triton`` on ``example`` inputs at SOLAR's
width), the self-check (solar_kernels.selfcheck) and the op benchmarks (benchmarks/cases.py: minimum
bytes from the contract). The compiled-code expectations of tests/ops/test_gpu_compile.py hold every
``*_kernel`` of the op file (the tool lists them) to 64 registers per thread, the elementwise
default; a kernel that needs another budget gets a line in its REGISTER_BUDGET table.

A kernel that is not elementwise writes its own ``Kernel(name, family, triton, outputs, rows_width,
example)`` and its own out-variant host function in csrc/ (``Tensor(a!)`` outputs, returning
``()``; the checks it keeps are those that protect memory), declared in csrc/ops.h. Rotary is the
worked example: its outputs keep the inputs' memory layout, so its record has an ``allocator``
instead of a shape/dtype contract; its one non-tensor argument (``backward``) follows the outputs in
the schema and is passed through ``launch(backend, *inputs, backward=...)`` by name; ``variants``
lists the values the compile tool and the tests launch it with; its ``Op`` takes gradients for q
and k only (``grad_inputs=2``) and is as wide as ``width_of(ModelConfig)``.

Every kernel of the package is such a record. RMSNorm (rms_norm.py) shows the rest: optional
tensors (``residual``, ``h``: ``Tensor?`` in the schema, None in the launch), an allocator that
takes an option (``allocate_options``: ``promote`` widens y under autocast), options only Triton has
(``cuda_options=("eps",)``; ``cuda_lacks`` names the one a launch uses, which a named "cuda" refuses
by name), dtypes only Triton has (``cuda_takes``: Triton on every backend), an ``Op`` whose inputs
are not its forward kernel's (``inputs``) and the launches the compile tool compiles besides SOLAR's
(``compile_launches``: the residual variant, wide rows, autocast's dtypes).

A kernel that writes in place (the log-prob row step, ``LOGPROBS`` in linear_logprobs.py) declares
no outputs (``outputs=lambda *inputs: ()``) and names the inputs it writes (``in_place``); a CUDA twin
that lacks some of the Triton launcher's options says which launches it runs (``cuda_runs``: "auto"
then takes Triton for the others, a named "cuda" is refused) and which options it takes
(``cuda_options``); a kernel no ``Op`` covers gives its SOLAR launch shape (``shape_of``) for the
compile tool.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._autotune import pick

# (shape, dtype) of each output, in order.
Contract = tuple[tuple[tuple[int, ...], torch.dtype], ...]
# example(rows, width, dtype, device, make) -> the inputs of a launch over rows x width, made by
# ``make(rows, width, dtype=..., device=...)`` (torch.randn to time, torch.empty to compile).
Example = Callable[..., tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class Kernel:
    """One launched kernel (forward and backward are two), under both fast backends."""

    name: str  # the key of auto's table and the name of the CUDA op: torch.ops.solar_kernels_C.<name>
    family: str  # the op file it lives in: solar_kernels/ops/<family>.py
    triton: Callable[..., None] | None = None  # triton(*inputs, *outputs) writes the outputs
    outputs: Callable[..., Contract] | None = None  # the output contract: inputs -> (shape, dtype) each
    rows_width: Callable[..., tuple[int, int]] | None = None  # inputs -> (rows, width): auto's shape class
    example: Example | None = None
    # allocator(*inputs) -> fresh outputs, for outputs a shape/dtype contract cannot say (a layout)
    allocator: Callable[..., tuple[torch.Tensor, ...]] | None = None
    # The non-tensor arguments each example launch is run with, by name (they follow the outputs in
    # the CUDA op's schema and in the Triton launcher's signature): one dict per variant to compile/test.
    variants: tuple[dict[str, object], ...] = ({},)
    cuda_name: str | None = None  # the CUDA op's name where it is not ``name`` (logprobs_: in place)
    # cuda_runs(*inputs, **options): whether the CUDA twin implements this launch (else Triton runs it)
    cuda_runs: Callable[..., bool] | None = None
    cuda_options: tuple[str, ...] | None = None  # the options the CUDA op takes (None: every one)
    in_place: tuple[int, ...] = ()  # the inputs the kernel writes (an in-place kernel has no outputs)
    # shape_of(config, tokens) -> (rows, width) of one launch in that model, for a kernel no Op covers
    shape_of: Callable[..., tuple[int, int]] | None = None
    allocate_options: tuple[str, ...] = ()  # the options the allocator takes (not passed to the launchers)
    # cuda_lacks(*inputs, **options) -> the option of this launch the CUDA twin lacks, named in the
    # refusal of a named "cuda" ("" when none; "auto" takes Triton for the others)
    cuda_lacks: Callable[..., str] | None = None
    # cuda_takes(*inputs, *outputs): whether the CUDA twin reads and writes these dtypes (else Triton
    # runs the launch on every backend, "cuda" included: the twin has no code for them)
    cuda_takes: Callable[..., bool] | None = None
    # compile_launches(dtype, make) -> [(label, at SOLAR's shape, inputs, options)]: the launches the
    # compile tool compiles, where one example per variant at SOLAR's shape is not all of them
    compile_launches: Callable[..., list[tuple[str, bool, tuple, dict]]] | None = None

    @property
    def out_variant(self) -> bool:
        """Whether dispatch, allocation and the CUDA op go through this record (every registered one's do)."""
        return self.triton is not None

    @property
    def cuda_op_name(self) -> str:
        return self.cuda_name or self.name

    def cuda_op(self):
        """torch.ops.solar_kernels_C.<name>, looked up when called (the extension loads lazily)."""
        return getattr(torch.ops.solar_kernels_C, self.cuda_op_name)

    def allocate(self, *inputs: torch.Tensor | None, **options) -> tuple[torch.Tensor | None, ...]:
        """Fresh outputs by the contract, on the device of the first input (fake tensors under tracing);
        ``options`` are the launch's, of which the allocator takes its ``allocate_options``."""
        if self.allocator is not None:
            return self.allocator(*inputs, **{key: options[key] for key in self.allocate_options if key in options})
        device = inputs[0].device
        return tuple(torch.empty(shape, dtype=dtype, device=device) for shape, dtype in self.outputs(*inputs))

    def launch(self, backend: str, *inputs: torch.Tensor | None, **options) -> tuple[torch.Tensor | None, ...]:
        """Allocate the outputs, run the implementation ``backend`` names ("triton", "cuda", or "auto":
        this GPU's choice for the launch's shape class) with the non-tensor ``options`` after the
        outputs, return the outputs."""
        outputs = self.allocate(*inputs, **options)
        options = {key: value for key, value in options.items() if key not in self.allocate_options}
        lacking = self.cuda_lacks(*inputs, **options) if self.cuda_lacks is not None else ""
        if not lacking and self.cuda_takes is not None and not self.cuda_takes(*inputs, *outputs):
            self.triton(*inputs, *outputs, **options)  # dtypes the twin has no code for: on any backend
            return outputs
        rows, width = self.rows_width(*inputs)
        runs = not lacking and (self.cuda_runs is None or self.cuda_runs(*inputs, **options))
        if self.choose(backend, rows, width, inputs[0].device, cuda_runs=runs, lacking=lacking) == "cuda":
            if self.cuda_options is not None:
                options = {key: value for key, value in options.items() if key in self.cuda_options}
            self.cuda_op()(*inputs, *outputs, **options)
        else:
            self.triton(*inputs, *outputs, **options)
        return outputs

    def choose(
        self, backend: str, rows: int, width: int, device: torch.device, *, cuda_runs: bool = True, lacking: str = ""
    ) -> str:
        """The implementation a launch over rows x width runs: ``backend`` itself, or for "auto" this
        GPU's choice for the shape class; Triton where the CUDA twin does not run the launch
        (``cuda_runs`` False: an option it lacks, named by ``lacking`` where the record says which),
        which a named "cuda" may not be; "auto" then asks nothing of this GPU's table (no timing
        runs for a launch only one backend has)."""
        if not cuda_runs:
            if backend == "cuda" and lacking:
                raise ValueError(
                    f"{self.family}: {lacking} is implemented by the 'torch', 'triton' backends only, "
                    f"got backend='cuda'"
                )
            if backend == "cuda":
                raise ValueError(
                    f"{self.name}: the CUDA kernel does not implement this launch's options, "
                    f"got backend='cuda' (use 'triton' or 'auto')"
                )
            return "triton"
        return pick(backend, self.name, rows, width, device)

    def make_case(self, backend: str, rows: int, width: int, device: torch.device) -> Callable[[], object]:
        """A callable running one launch of a bf16 problem of rows x width (what auto times)."""
        inputs = self.example(rows, width, torch.bfloat16, device, torch.randn)
        return lambda: self.launch(backend, *inputs, **self.variants[0])


@dataclass(frozen=True)
class Op:
    """A public op over the records of its kernels: what the self-check and the benchmarks run."""

    name: str  # the public function: solar_kernels.<name>
    fn: Callable[..., torch.Tensor]  # fn(*inputs, backend=...)
    ref: Callable[..., torch.Tensor]  # the PyTorch reference, ref(*inputs)
    kernels: tuple[Kernel, ...]  # forward first; its example gives the op's inputs
    width: str  # the ModelConfig field a row is as wide as ("intermediate_size"), or width_of's label
    width_of: Callable[..., int] | None = None  # ModelConfig -> row width, where no one field is it
    grad_inputs: int | None = None  # the leading inputs that take gradients (None: every input)
    # inputs(rows, width, dtype, device, make) -> the op's inputs, where they are not its forward
    # kernel's example (rms_norm's are x and weight; its kernel's are x, weight and residual)
    inputs: Example | None = None

    def example(self, rows: int, width: int, dtype: torch.dtype, device, make=torch.randn):
        return (self.inputs or self.kernels[0].example)(rows, width, dtype, device, make)

    def model_width(self, config) -> int:
        """The width of a row of this op in the model ``config`` (a ModelConfig)."""
        return self.width_of(config) if self.width_of is not None else getattr(config, self.width)

    def split(self, inputs) -> tuple[tuple, tuple]:
        """(inputs that take gradients, the constant rest) of an example."""
        count = len(inputs) if self.grad_inputs is None else self.grad_inputs
        return tuple(inputs[:count]), tuple(inputs[count:])


KERNELS: dict[str, Kernel] = {}
OPS: dict[str, Op] = {}


def register(kernel: Kernel) -> Kernel:
    """Add a record (an op file calls this at import); a second record of one name is an error."""
    known = KERNELS.get(kernel.name)
    if known is not None and known.family != kernel.family:  # a reloaded op file replaces its own
        raise ValueError(
            f"kernel registry: {kernel.name!r} is registered by {known.family} already, "
            f"got a second record from {kernel.family}"
        )
    if kernel.triton is None or kernel.example is None:
        raise ValueError(
            f"kernel registry: {kernel.name!r} needs a Triton launcher and example inputs, "
            f"got triton={kernel.triton!r}, example={kernel.example!r}"
        )
    KERNELS[kernel.name] = kernel
    return kernel


def register_op(op: Op) -> Op:
    OPS[op.name] = op
    return op


def custom_op(name: str, fake: Callable, schema: str | None = None) -> Callable:
    """Decorator: the function as the pure custom op ``torch.ops.solar_kernels.<name>`` (it mutates
    none of its inputs), with ``fake`` as its fake implementation (the output shapes and dtypes that
    FakeTensor tracing and torch.compile see). ``schema`` ("(arguments) -> outputs") where the
    function's annotations cannot give it (``*options`` arguments)."""

    def define(function: Callable) -> torch.library.CustomOpDef:
        op = torch.library.custom_op(f"solar_kernels::{name}", function, mutates_args=(), schema=schema)
        op.register_fake(fake)
        return op

    return define


def kernels() -> list[Kernel]:
    """Every record, in registration order (importing solar_kernels.ops registers them all)."""
    importlib.import_module("solar_kernels.ops")
    return list(KERNELS.values())


def ops() -> list[Op]:
    importlib.import_module("solar_kernels.ops")
    return list(OPS.values())


def families() -> list[str]:
    """The op files that hold kernels, in registration order."""
    return list(dict.fromkeys(k.family for k in kernels()))


# ---- elementwise kernels over rows -------------------------------------------------------------


def rows_width(tensor: torch.Tensor) -> tuple[int, int]:
    """(rows, width) of a [..., width] tensor."""
    width = tensor.shape[-1]
    return (tensor.numel() // width if width else 0), width


def elementwise(name: str, family: str, triton: Callable[..., None], *, inputs: int, outputs: int) -> Kernel:
    """A record for a kernel over ``inputs`` tensors [..., width] of one shape and dtype that writes
    ``outputs`` more of them (contiguous); its CUDA twin is bound by csrc/rows_host.cpp."""

    def contract(*tensors: torch.Tensor) -> Contract:
        _check_count(name, tensors, inputs)
        return ((tuple(tensors[0].shape), tensors[0].dtype),) * outputs

    def shape_class(*tensors: torch.Tensor) -> tuple[int, int]:
        _check_count(name, tensors, inputs)
        return rows_width(tensors[0])

    def example(rows: int, width: int, dtype: torch.dtype, device, make=torch.randn) -> tuple[torch.Tensor, ...]:
        return tuple(make(rows, width, dtype=dtype, device=device) for _ in range(inputs))

    return Kernel(name, family, triton=triton, outputs=contract, rows_width=shape_class, example=example)


def _check_count(name: str, tensors: tuple, expected: int) -> None:
    if len(tensors) != expected:
        raise TypeError(f"{name}: expected {expected} input tensors, got {len(tensors)}")
