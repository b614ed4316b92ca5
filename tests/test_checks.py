"""The argument checks shared by the ops and merging (solar_kernels/_checks.py)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from solar_kernels._checks import is_finite_number
from solar_kernels.merge.registry import Parameter
from solar_kernels.ops.dpo_loss import check_loss_options


@pytest.mark.parametrize("value", [0, -3, 0.5, 1e300, np.float32(0.25), np.int64(2), Fraction(1, 3)])
def test_a_finite_real_number_of_any_numeric_type_is_a_number(value):
    assert is_finite_number(value)


@pytest.mark.parametrize("value", [True, False, math.nan, math.inf, -math.inf, np.float32("nan"), "1", None, 1j, [1]])
def test_bools_non_finite_values_and_non_numbers_are_not(value):
    assert not is_finite_number(value)


def test_the_ops_and_merge_take_the_same_numbers():
    # dpo_loss took int/float only and merge numbers.Real: one check now says what a number is for both.
    beta = np.float32(0.2)
    assert check_loss_options(beta=beta) == ["sigmoid"]
    assert Parameter("weight").check("recipe", beta) == beta
    for refused in (True, math.nan):
        with pytest.raises(ValueError, match="beta must be a positive float"):
            check_loss_options(beta=refused)
        with pytest.raises(ValueError, match="weight must be a finite number"):
            Parameter("weight").check("recipe", refused)
