"""Tests of solar_kernels/fields.py: integer bounds declared with a dataclass field, and the configs that use them."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from solar_kernels.fields import at_least, below_minimum


@dataclass
class _Section:
    name: str = "x"
    steps: int = at_least(1, 10)
    seed: int = -3  # no bound
    keep: int = at_least(0, 2)


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({}, None),
        ({"steps": 1, "keep": 0}, None),
        ({"steps": 0}, ("steps", 1, 0)),
        ({"keep": -1}, ("keep", 0, -1)),
        ({"steps": 0, "keep": -1}, ("steps", 1, 0)),  # the first in declaration order
        ({"steps": 2.5}, ("steps", 1, 2.5)),  # not an int
        ({"seed": -100}, None),  # a field without a bound is not checked
    ],
)
def test_below_minimum_names_the_first_field_out_of_bounds(changes, expected):
    assert below_minimum(_Section(**changes)) == expected


def test_at_least_keeps_the_default_and_refuses_one_below_the_bound():
    assert _Section().steps == 10 and _Section().keep == 2
    with pytest.raises(ValueError, match="at_least: default 0 is below the minimum 1"):
        at_least(1, 0)


@pytest.mark.parametrize("name", ["vocab_size", "hidden_size", "intermediate_size", "num_layers"])
def test_model_config_sizes_must_be_positive(name):
    from solar_kernels.model.config import ModelConfig

    with pytest.raises(ValueError, match=rf"^ModelConfig: {name} must be a positive int, got 0$"):
        ModelConfig(**{name: 0})


def test_training_config_bounds_come_from_the_fields():
    from training.config import load_config

    with pytest.raises(ValueError, match=r"^config: train.keep_last must be >= 0, got -1$"):
        load_config(None, ["--model.preset=tiny", "--train.keep_last=-1"])
    with pytest.raises(ValueError, match=r"^config: data.seq_len must be >= 1, got 0$"):
        load_config(None, ["--model.preset=tiny", "--data.seq_len=0"])
