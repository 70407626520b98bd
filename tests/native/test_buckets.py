"""native.buckets: the one bucket lookup (1D bounds, NeMo's 2D bins) against numpy and a plain-Python reference."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from native.buckets import LINEAR_BOUNDS, bucket_1d, bucket_2d, duration_groups
from tests.native.test_duration import ref_assign_2d


@settings(max_examples=60, deadline=None)
@given(nb=st.integers(0, 3 * LINEAR_BOUNDS), n=st.integers(1, 200), seed=st.integers(0, 2**32))
def test_bucket_1d_is_searchsorted_left(nb, n, seed):
    """Both regimes (a count up to LINEAR_BOUNDS bounds, bisection above), ties on a bound, values outside."""
    rng = np.random.default_rng(seed)
    bounds = np.sort(rng.choice(np.arange(1.0, 50.0, 0.5), nb))  # repeated bounds too
    x = np.concatenate([rng.choice(np.arange(0.0, 52.0, 0.5), n), rng.uniform(0, 52, n)])
    got = [bucket_1d(v, bounds) for v in x]
    assert got == np.searchsorted(bounds, x, side="left").tolist()


def test_bucket_1d_nan_goes_first():
    for nb in (3, LINEAR_BOUNDS + 5):
        assert bucket_1d(np.nan, np.arange(1.0, nb + 1.0)) == 0


@settings(max_examples=40, deadline=None)
@given(ndur=st.sampled_from([1, 3, LINEAR_BOUNDS + 7]), nsub=st.integers(1, 3), strict=st.booleans(),
       seed=st.integers(0, 2**32))
def test_bucket_2d_matches_reference(ndur, nsub, strict, seed):
    """Cut by cut, against the plain rule: more duration bounds than LINEAR_BOUNDS, cuts on a bound, cuts over
    every bin, and NaN tokens (no bin holds them)."""
    rng = np.random.default_rng(seed)
    bd = np.unique(rng.integers(1, 200, ndur)).astype(np.float64)
    bins = np.array([(d, t) for d in bd for t in np.unique(rng.integers(1, 40, nsub))], dtype=np.float64)
    n = 300
    dur = np.concatenate([rng.uniform(0.5, 210, n), rng.choice(bd, 20)])
    tok = np.concatenate([rng.integers(0, 45, n), rng.choice(bins[:, 1], 20)]).astype(np.float64)
    tok[::37] = np.nan
    bounds, starts = duration_groups(bins[:, 0].copy())
    assert bounds.tolist() == bd.tolist() and starts[-1] == len(bins)
    got = [bucket_2d(d, t, bounds, starts, bins[:, 1].copy(), strict) for d, t in zip(dur, tok)]
    want_b, want_p = ref_assign_2d(dur, tok, bins.tolist(), strict)
    assert [int(g[0]) for g in got] == list(want_b)
    assert [bool(g[1]) for g in got] == list(want_p)
    assert all(g[0] == -1 for g in got[::37])
