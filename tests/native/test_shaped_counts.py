"""native.shaped_counts against a plain-Python reference, and its invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from native.shaped_counts import shaped_counts


def reference(step_group, weights, unit, avail, rows_per_step):
    """The same rule in plain Python (ties, which random float weights do not produce, go to the lower index)."""
    T, D = weights.shape
    target, got = [0.0] * D, [0.0] * D
    out = np.zeros((T, D), dtype=np.int64)
    for s in range(T):
        g, n = step_group[s], rows_per_step[step_group[s]]
        elig = [d for d in range(D) if avail[d, g] > 0]
        wsum = sum(weights[s, d] for d in elig)
        est = n * sum(weights[s, d] * unit[d, g] for d in elig) / wsum if wsum > 0 else 0.0
        x = [0.0] * D
        for d in elig:
            x[d] = max(0.0, (target[d] - got[d] + weights[s, d] * est) / unit[d, g])
        if sum(x) <= 0:
            for d in elig:
                x[d] = weights[s, d] if wsum > 0 else 1.0
        tot = sum(x)
        x = [v * n / tot for v in x]
        base = [int(np.floor(v + 1e-9)) for v in x]
        rest = sorted(elig, key=lambda d: (-round(max(x[d] - base[d], 0.0), 9), d))
        for d in rest[: n - sum(base)]:
            base[d] += 1
        out[s] = base
        delivered = sum(base[d] * unit[d, g] for d in range(D))
        for d in range(D):
            got[d] += base[d] * unit[d, g]
            target[d] += weights[s, d] * delivered
    return out


def problem(seed, T, D, G):
    rng = np.random.default_rng(seed)
    avail = rng.integers(0, 4, (D, G)) * rng.integers(1, 50, (D, G))
    avail[:, 0] = np.maximum(avail[:, 0], 1)  # group 0 is in every domain
    unit = rng.uniform(0.5, 3.0, (D, G))
    w = rng.dirichlet(np.ones(D), T)
    has = np.flatnonzero(avail.sum(axis=0) > 0)
    step_group = rng.choice(has, T)
    rows = rng.integers(1, 40, G)
    return step_group, w, unit, avail, rows


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), T=st.integers(1, 60), D=st.integers(1, 5), G=st.integers(1, 4))
def test_matches_reference(seed, T, D, G):
    args = problem(seed, T, D, G)
    counts, _ = shaped_counts(*args, seed=seed)
    np.testing.assert_array_equal(counts, reference(*args))
    step_group, _, _, avail, rows = args
    np.testing.assert_array_equal(counts.sum(axis=1), rows[step_group])
    assert not (counts[avail.T[step_group] == 0]).any(), "a domain got rows of a group it has none of"


def test_shares_hold_when_every_domain_has_every_group():
    T, D = 2000, 3
    w = np.tile([0.5, 0.3, 0.2], (T, 1))
    unit = np.array([[32.0, 512.0]] * D)
    step_group = np.random.default_rng(0).integers(0, 2, T)
    counts, fallback = shaped_counts(step_group, w, unit, np.ones((D, 2), np.int64), np.array([128, 8]), seed=0)
    units = (counts * unit.T[step_group]).cumsum(axis=0)
    share = units / units.sum(axis=1, keepdims=True)
    # error carried forward: after the first few steps the running share is within a step's rounding
    assert np.abs(share[50:] - w[50:]).max() < 0.01
    assert fallback == 0


def test_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="shapes disagree"):
        shaped_counts(np.zeros(2, np.int64), np.ones((2, 2)) / 2, np.ones((3, 1)), np.ones((3, 1)), np.ones(1), 0)
    with pytest.raises(ValueError, match="step 1 takes group 1, which no domain has rows in"):
        shaped_counts(np.array([0, 1]), np.ones((2, 1)), np.ones((1, 2)), np.array([[1, 0]]), np.ones(2), 0)
