"""native.rounding.largest_remainder against a plain-Python reference (Hamilton's method, one row at a time)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from native.rounding import largest_remainder


def reference(w: list[float], total: int) -> list[int]:
    """Hamilton's method on exact rational quotas of the float weights; ties to the lower index."""
    quotas = [Fraction(x) * total / sum(Fraction(v) for v in w) for x in w]
    base = [math.floor(q) for q in quotas]
    short = total - sum(base)
    order = sorted(range(len(w)), key=lambda i: (-(quotas[i] - base[i]), i))
    return [b + (i in order[:short]) for i, b in enumerate(base)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=8).filter(lambda v: sum(v) > 0), st.integers(1, 400),
       st.booleans())
def test_matches_the_reference_on_rational_weights(parts, total, exact):
    """Weights k / K: the float quotas carry rounding noise, which the default mode reads through."""
    w = np.array(parts, dtype=np.float64) / sum(parts)
    got = largest_remainder(w, total, exact=exact)[0]
    assert got.sum() == total and np.all(np.abs(got - w * total) < 1)
    if not exact:  # exact mode may resolve a float-noise tie the other way; the default must not
        assert got.tolist() == reference([p / sum(parts) for p in parts], total) or _noise_tie(parts, total)


def _noise_tie(parts: list[int], total: int) -> bool:
    # rational remainders that are equal (a true tie) go to the lower index in both; nothing else may differ
    rem = [Fraction(p * total, sum(parts)) % 1 for p in parts]
    return len(set(rem)) < len(rem)


@pytest.mark.parametrize("w, total, want", [([1 / 3, 1 / 3, 1 / 3], 4, [2, 1, 1]), ([0.1, 0.2, 0.7], 10, [1, 2, 7]),
                                            ([0.5, 0.5, 0.0], 3, [2, 1, 0]), ([0.3, 0.3, 0.4], 10, [3, 3, 4])])
def test_float_noise_is_read_through_and_ties_go_low(w, total, want):
    assert largest_remainder(np.array(w), total)[0].tolist() == want


def test_tie_keys_decide_ties_and_are_checked():
    w = np.tile([0.5, 0.5], (2, 1))
    assert largest_remainder(w, 1, np.array([[0.1, 0.9], [0.9, 0.1]])).tolist() == [[0, 1], [1, 0]]
    with pytest.raises(ValueError, match="tie_keys must be floats in"):
        largest_remainder(w, 1, np.ones((2, 2)))
    with pytest.raises(ValueError, match="pass exact=False"):
        largest_remainder(w, 1, np.zeros((2, 2)), exact=True)
