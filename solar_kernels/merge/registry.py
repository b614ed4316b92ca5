"""The merge methods, each declaring its parameters and defaults (as mergekit's ``MergeMethod``).

A method is one ``MergeMethod`` passed to ``register`` from its own module (``linear.py``,
``slerp.py``, ``task_arithmetic.py``, ...; a module with one method declares it with the
``@merge_method(name=..., ...)`` decorator on its ``combine`` function): its name, the parameters
that take one value for all models (``parameters``) and those that take one value per model
(``tensor_parameters``), whether it needs a base model, and ``combine``, the per-tensor function:

    combine(base, tensors, params, model_params, generator) -> merged tensor

``tensors`` are the models' tensors (the base model's excluded, it is ``base``, or None), already in
the compute dtype; ``params`` maps each parameter name to its value for this tensor and
``model_params[i]`` does the same for ``tensors[i]``; ``generator`` is the merge's seeded
``torch.Generator`` for methods with ``random=True`` (None for the others). The result is stored in the output
dtype by the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .._checks import is_finite_number

# Marks a parameter without a default: every model (or the merge) must give it.
REQUIRED = object()


@dataclass(frozen=True)
class Parameter:
    """One merge parameter: its name, default (or ``REQUIRED``), kind ("number" or "bool") and,
    for numbers, the allowed range as a predicate plus the words that say it."""

    name: str
    default: object = REQUIRED
    kind: str = "number"
    allowed: Callable[[float], bool] | None = None
    expected: str = ""

    def check(self, where: str, value) -> object:
        """``value`` if valid for this parameter, else a one-line ValueError naming ``where``."""
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{where}: {self.name} must be true or false, got {value!r}")
            return value
        if not is_finite_number(value):
            raise ValueError(f"{where}: {self.name} must be a finite number, got {value!r}")
        if self.allowed is not None and not self.allowed(value):
            raise ValueError(f"{where}: {self.name} must be {self.expected}, got {value!r}")
        return value


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: see the module docstring. ``base_model`` is "required", "first" (slerp: the
    t = 0 end, else the first model), "optional" (``base`` is None without one) or "none";
    ``min_models``/``max_models`` count the models merged besides the base; ``random`` says whether
    the result depends on the seed."""

    name: str
    summary: str
    combine: Callable
    parameters: tuple[Parameter, ...] = ()
    tensor_parameters: tuple[Parameter, ...] = ()
    base_model: str = "none"
    min_models: int = 2
    max_models: int | None = None
    random: bool = False
    reference: str = ""

    def parameter_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)

    def tensor_parameter_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.tensor_parameters)


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def merge_method(**fields) -> Callable[[Callable], Callable]:
    """Decorator of a method's ``combine`` function: registers ``MergeMethod(combine=<the function>,
    **fields)`` and returns the function as it is."""

    def add(combine: Callable) -> Callable:
        register(MergeMethod(combine=combine, **fields))
        return combine

    return add


def get_method(name) -> MergeMethod:
    """The registered method ``name``, else a one-line ValueError listing the methods there are."""
    if name not in METHODS:
        raise ValueError(f"merge method must be one of {', '.join(sorted(METHODS))}, got {name!r}")
    return METHODS[name]


def fraction(low_open: bool = True) -> Callable[[float], bool]:
    """A predicate for a value in (0, 1] (``low_open``) or [0, 1]."""
    return (lambda v: 0.0 < v <= 1.0) if low_open else (lambda v: 0.0 <= v <= 1.0)
