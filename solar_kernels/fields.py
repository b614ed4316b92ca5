"""Dataclass fields with a lower bound, declared with the field and checked in one place.

    @dataclass
    class Section:
        # Optimizer steps to run.
        steps: int = at_least(1, 100)

    below_minimum(Section(steps=0))  # ("steps", 1, 0)

``ModelConfig`` (its sizes are positive) and the sections of the training configuration (step
counts, intervals) declare their integer bounds this way; each caller words its own error.
"""

from __future__ import annotations

import dataclasses
from typing import Any

_MINIMUM = "minimum"  # the metadata key of a bounded field


def at_least(minimum: int, default: int) -> Any:
    """A dataclass field whose value defaults to ``default`` and must be an int >= ``minimum``."""
    if default < minimum:
        raise ValueError(f"at_least: default {default} is below the minimum {minimum}")
    return dataclasses.field(default=default, metadata={_MINIMUM: minimum})


def below_minimum(instance: object) -> tuple[str, int, object] | None:
    """(name, minimum, value) of the first field of the dataclass ``instance``, in declaration order,
    that was declared with ``at_least`` and whose value is not an int of at least its minimum; None
    when every such field is within its bound."""
    for field in dataclasses.fields(instance):
        minimum = field.metadata.get(_MINIMUM)
        if minimum is None:
            continue
        value = getattr(instance, field.name)
        if not isinstance(value, int) or value < minimum:
            return field.name, minimum, value
    return None
