"""Merge parameters as mergekit's YAML writes them, evaluated per tensor.

A parameter setting is one of
- a number (or true/false): the same value for every tensor;
- a gradient, a list of numbers ``[v_0, ..., v_{k-1}]``: the value for a layer at position
  ``t`` in [0, 1] along its slice is the linear interpolation
      s = t (k - 1),  i = floor(s),  value = (1 - (s - i)) v_i + (s - i) v_{min(i + 1, k - 1)};
- a list of filters ``[{filter: self_attn, value: ...}, {value: ...}]`` (or one such mapping): the
  first entry whose
  ``filter`` is a substring of the tensor's name (no filter, or ``"*"``, matches every tensor) gives
  the value, itself a number or a gradient. When none matches, the next level is asked.

Levels, first value wins (mergekit's order): the model's own ``parameters`` (in ``models:`` or a
slice's ``sources:``), the slice's ``parameters``, the top-level ``parameters``, the method's
default. Position ``t`` of layer ``i`` of a slice of ``n`` layers is ``i / (n - 1)`` (1 when
``n == 1``); tensors outside the decoder layers (embedding, final norm, LM head) have ``t = 0``.
The arithmetic is mergekit's, in Python floats, so a gradient gives the same value bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .._checks import is_finite_number

# A checked setting: a number/bool, a list of numbers, or a tuple of (filter | None, number | list).
Setting = object

_FILTER_KEYS = ("filter", "value")


def check_setting(where: str, value) -> Setting:
    """``value`` in the checked form, or a one-line ValueError naming ``where`` and what was given."""
    if isinstance(value, bool) or is_finite_number(value):
        return value
    if isinstance(value, tuple) and value and all(isinstance(e, tuple) and len(e) == 2 for e in value):
        return tuple(_check_filter(f"{where}[{i}]", {"filter": f, "value": v}) for i, (f, v) in enumerate(value))
    if isinstance(value, Mapping):  # one {filter, value} entry: a one-item list (as mergekit)
        return (_check_filter(where, value),)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and value:
        if all(is_finite_number(v) for v in value):
            return list(value)
        if all(isinstance(v, Mapping) for v in value):
            return tuple(_check_filter(f"{where}[{i}]", entry) for i, entry in enumerate(value))
    raise ValueError(
        f"{where}: expected a number, a gradient (a non-empty list of numbers) or a list of "
        f"{{filter: ..., value: ...}} entries, got {value!r}"
    )


def check_parameters(where: str, level, allowed: Sequence[str], method: str) -> dict[str, Setting]:
    """One level of parameters (a mapping of names in ``allowed`` to settings, or None: no
    parameters) in the checked form, or a one-line ValueError naming ``where`` and what was given."""
    if level is None:
        return {}
    if not isinstance(level, Mapping):
        raise ValueError(f"{where}: expected a mapping of parameter names to values, got {level!r}")
    unknown = [key for key in level if key not in allowed]
    if unknown:
        expected = ("some of " if len(allowed) > 1 else "") + (", ".join(allowed) or "(none)")
        raise ValueError(f"{where}: parameter {unknown[0]!r} does not apply to {method}; expected {expected}")
    return {key: check_setting(f"{where}: {key}", value) for key, value in level.items()}


def _check_filter(where: str, entry: Mapping) -> tuple[str | None, Setting]:
    unknown = [key for key in entry if key not in _FILTER_KEYS]
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; expected filter and value")
    if "value" not in entry:
        raise ValueError(f"{where}: a filter entry needs a value, got {dict(entry)!r}")
    name_filter = entry.get("filter")
    if name_filter is not None and not isinstance(name_filter, str):
        raise ValueError(f"{where}: filter must be a piece of a tensor name (a string), got {name_filter!r}")
    value = entry["value"]
    if not (
        isinstance(value, bool)
        or is_finite_number(value)
        or (isinstance(value, list) and value and all(is_finite_number(v) for v in value))
    ):
        raise ValueError(f"{where}: value must be a number or a gradient (a list of numbers), got {value!r}")
    return name_filter, value


def evaluate(setting: Setting, tensor_name: str, t: float):
    """The value of a checked ``setting`` for the tensor ``tensor_name`` at layer position ``t``;
    None when it is a filter list none of whose filters matches."""
    if isinstance(setting, list):
        scaled = t * (len(setting) - 1)
        low = int(scaled)
        high = min(len(setting) - 1, low + 1)
        fraction = scaled - low
        return (1 - fraction) * setting[low] + fraction * setting[high]
    if isinstance(setting, tuple):
        for name_filter, value in setting:
            if name_filter is None or name_filter == "*" or (tensor_name and name_filter in tensor_name):
                return evaluate(value, tensor_name, t)
        return None
    return setting


def resolve(name: str, levels: Sequence[Mapping[str, Setting] | None], tensor_name: str, t: float, default):
    """The first value of parameter ``name`` over ``levels`` (most specific first), else ``default``."""
    for level in levels:
        if level and name in level:
            value = evaluate(level[name], tensor_name, t)
            if value is not None:
                return value
    return default


def is_uniform(setting: Setting) -> bool:
    """True when ``setting`` is one plain value (no gradient, no filters)."""
    return not isinstance(setting, (list, tuple))
