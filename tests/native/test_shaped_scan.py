"""native.shaped_scan: the chunked counting kernels agree with plain numpy (bincount / searchsorted), bitwise, for any
chunking; the first bad row is reported."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from native.shaped_scan import BAD_GROUP, BAD_SIZE, BIG_GROUP, scan_buckets, scan_groups


def chunks(n, cut):
    return [(a, min(n, a + cut)) for a in range(0, n, cut)]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 400), groups=st.integers(1, 9), cut=st.integers(1, 500), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from([np.int8, np.int16, np.int32, np.int64]))
def test_scan_groups_is_bincount_in_row_order(n, groups, cut, seed, dtype):
    rng = np.random.default_rng(seed)
    g = rng.integers(-1, groups, n).astype(dtype)
    s = rng.lognormal(0.0, 2.0, n).astype(np.float32)
    counts, units = np.zeros(groups + 2, np.int64), np.zeros(groups + 2)
    out = np.full(n, 99, np.uint8)
    for a, b in chunks(n, cut):
        assert scan_groups(g[a:b], s[a:b], counts, units, out=out[a:b]) == (-1, 0)
    keep = g >= 0
    np.testing.assert_array_equal(counts, np.bincount(g.astype(np.int64) + 1, minlength=groups + 2))
    want = np.bincount(g[keep].astype(np.int64) + 1, weights=s[keep].astype(np.float64), minlength=groups + 2)
    assert units.tobytes() == want.tobytes()  # bitwise: the same additions in the same order
    np.testing.assert_array_equal(out, g.astype(np.int64) + 1)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 400), nbins=st.integers(0, 80), cut=st.integers(1, 500), seed=st.integers(0, 2**32 - 1),
       quadratic=st.sampled_from([0.0, 15.0]), floor=st.booleans())
def test_scan_buckets_is_searchsorted_and_bincount(n, nbins, cut, seed, quadratic, floor):
    rng = np.random.default_rng(seed)
    v = rng.lognormal(1.0, 1.0, n).astype(np.float32)
    if floor:
        v = np.floor(v * 3).astype(np.float32)  # zeros count as 1
    bins = np.unique(rng.uniform(0.5, 20.0, nbins))
    budget = 25.0
    counts, units, top = np.zeros(len(bins) + 2, np.int64), np.zeros(len(bins) + 2), np.full(1, -np.inf)
    out = np.full(n, 99, np.uint8)
    for a, b in chunks(n, cut):
        assert scan_buckets(v[a:b], bins, budget, quadratic, floor, counts, units, top, out=out[a:b]) == (-1, 0)
    x = v.astype(np.float64)
    if floor:
        x = np.maximum(x, 1.0)
    cost = x if quadratic == 0 else x + x * x / quadratic
    k = np.searchsorted(bins, x, side="left") + 1
    k[cost > budget] = 0
    np.testing.assert_array_equal(counts, np.bincount(k, minlength=len(bins) + 2))
    kept = k > 0
    want = np.bincount(k[kept], weights=x[kept], minlength=len(bins) + 2)
    assert units.tobytes() == want.tobytes()
    np.testing.assert_array_equal(out, k)
    open_rows = x[k == len(bins) + 1]
    assert top[0] == (open_rows.max() if len(open_rows) else -np.inf)


@pytest.mark.parametrize("bad, code", [(-2, BAD_GROUP), (8, BIG_GROUP)])
def test_scan_groups_names_the_first_bad_row(bad, code):
    g = np.zeros(50, np.int32)
    g[[17, 30]] = bad
    counts, units = np.zeros(9, np.int64), np.zeros(9)
    assert scan_groups(g, None, counts, units) == (17, code)
    s = np.ones(50)
    s[12] = np.nan
    assert scan_groups(np.zeros(50, np.int8), s, counts, units) == (12, BAD_SIZE)
    assert scan_groups(np.zeros(50, np.int8), s, counts, units, check_sizes=False) == (-1, 0)


def test_scan_buckets_flags_nan_and_non_positive_kept_rows():
    counts, units, top = np.zeros(4, np.int64), np.zeros(4), np.full(1, -np.inf)
    v = np.array([1.0, 2.0, np.nan, 3.0])
    assert scan_buckets(v, np.array([1.5, 2.5]), 10.0, 0.0, False, counts, units, top) == (2, BAD_SIZE)
    v = np.array([1.0, -1.0])
    assert scan_buckets(v, np.array([1.5]), 10.0, 0.0, False, counts, units, top) == (1, BAD_SIZE)
    assert scan_buckets(v, np.array([1.5]), 10.0, 0.0, True, counts, units, top) == (-1, 0)  # floored to 1
