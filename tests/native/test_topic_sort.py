"""native.topic_sort against plain numpy references: the counting sort by cluster (scan, count, scatter, chunk by
chunk) is a stable argsort, and cluster_rows is feistel_range over each cluster's slice."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from native.feistel import feistel_range
from native.rng import mix_prefix, mix_seed
from native.topic_sort import cluster_rows, count_ids, scan_ids, scatter_rows


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3000), k=st.integers(1, 50), chunk=st.integers(1, 700), seed=st.integers(0, 2**31),
       dtype=st.sampled_from([np.int32, np.int64, np.uint16]))
def test_chunked_counting_sort_is_a_stable_argsort(n, k, chunk, seed, dtype):
    ids = np.random.default_rng(seed).integers(0, k, n).astype(dtype)
    counts = np.zeros(k, dtype=np.int64)
    prev, ordered = -(1 << 62), True
    for a in range(0, n, chunk):
        neg, lo, hi, ok = scan_ids(ids[a : a + chunk], prev)
        part = ids[a : a + chunk].astype(np.int64)
        assert (neg, lo, hi) == (-1, part.min(), part.max())
        ordered, prev = ordered and ok, int(ids[min(n, a + chunk) - 1])
        count_ids(ids[a : a + chunk], counts)
    assert np.array_equal(counts, np.bincount(ids.astype(np.int64), minlength=k))
    assert ordered == bool(np.all(np.diff(ids.astype(np.int64)) >= 0))
    cursor = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    out = np.full(n, -1, dtype=np.int32)
    for a in range(0, n, chunk):
        scatter_rows(ids[a : a + chunk], a, np.arange(k, dtype=np.int64), cursor, out)
    assert np.array_equal(out, np.argsort(ids, kind="stable"))


def test_scan_finds_the_first_negative_row_and_order_across_chunks():
    assert scan_ids(np.array([3, -1, 5, -7]))[0] == 1
    assert scan_ids(np.array([1, 2, 2]), prev=1)[3] and not scan_ids(np.array([1, 2, 2]), prev=2)[3]
    assert scan_ids(np.zeros(0, dtype=np.int32)) == (-1, 0, -1, True)


@pytest.mark.parametrize("identity", [False, True])
def test_cluster_rows_is_feistel_over_each_cluster_slice(identity):
    rng = np.random.default_rng(3)
    sizes = np.array([1, 5, 0, 64, 2, 300])
    off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    rows = None if identity else rng.permutation(int(off[-1])).astype(np.int32)
    seg_c = np.array([3, 5, 1, 0, 5, 4])
    seg_s = np.array([10, 0, 2, 0, 150, 1])
    seg_l = np.array([20, 150, 3, 1, 150, 1])
    got = cluster_rows(rows, seg_c, seg_s, seg_l, off, mix_prefix(9, 2, 1))
    want = []
    for c, s, ln in zip(seg_c, seg_s, seg_l):
        pos = off[c] + feistel_range(int(s), int(s + ln), int(sizes[c]), mix_seed(9, 2, 1, int(c)))
        want.append(pos if identity else rows[pos].astype(np.int64))
    assert got.dtype == np.int64 and np.array_equal(got, np.concatenate(want))
    whole = cluster_rows(rows, [5], [0], [300], off, mix_prefix(9, 2, 1))
    base = np.arange(off[5], off[6]) if identity else rows[off[5] : off[6]]
    assert sorted(whole.tolist()) == sorted(base.tolist())  # a permutation of the cluster's rows
