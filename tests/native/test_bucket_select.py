"""native.bucket_select: per-chunk counts and the j-th row of a value, against numpy references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from native.bucket_select import VALUES, chunk_counts, select_rows


def ref_counts(values, chunk):
    nc = -(-len(values) // chunk)
    out = np.zeros((nc, VALUES), dtype=np.int64)
    for c in range(nc):
        part = values[c * chunk : (c + 1) * chunk].astype(np.int64)
        out[c] = np.bincount(part[(part >= 0) & (part < VALUES)], minlength=VALUES)
    return out


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3000), chunk=st.integers(1, 700), lo=st.integers(0, 10), span=st.integers(1, 6),
       seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([np.int8, np.int16, np.int64, np.uint8]))
def test_counts_and_select_match_numpy(n, chunk, lo, span, seed, dtype):
    rng = np.random.default_rng(seed)
    values = rng.integers(lo, lo + span, n).astype(dtype)
    counts, bad = chunk_counts(values, chunk)
    assert bad == -1 and counts.dtype == np.int32
    np.testing.assert_array_equal(counts, ref_counts(values, chunk))
    for k in np.unique(values).tolist():
        cum = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts[:, k], out=cum[1:])
        where = np.flatnonzero(values == k)
        ranks = rng.integers(0, len(where), 50)  # any order, repeats allowed
        np.testing.assert_array_equal(select_rows(values, chunk, cum, k, ranks), where[ranks])
        np.testing.assert_array_equal(select_rows(values, chunk, cum, k, np.arange(len(where))), where)


def test_reads_a_memory_map_in_place(tmp_path):
    values = (np.arange(100_000) % 7 + 3).astype(np.int8)
    np.save(tmp_path / "v.npy", values)
    mm = np.load(tmp_path / "v.npy", mmap_mode="r")
    counts, _ = chunk_counts(mm, 4096)
    cum = np.concatenate([[0], np.cumsum(counts[:, 5], dtype=np.int64)])
    assert select_rows(mm, 4096, cum, 5, np.array([0, 1, 14284])).tolist() == [2, 9, 14284 * 7 + 2]


@pytest.mark.parametrize("bad_value", [-1, 64, 100])
def test_out_of_range_values_are_reported_by_row(bad_value):
    values = np.full(5000, 3, dtype=np.int16)
    values[4321] = bad_value
    values[4400] = bad_value
    counts, bad = chunk_counts(values, 1000)
    assert bad == 4321
    assert counts.sum() == 4998


def test_bad_arguments():
    with pytest.raises(TypeError, match="1-D integer"):
        chunk_counts(np.zeros(3, np.float32), 4)
    with pytest.raises(ValueError, match="chunk must be"):
        chunk_counts(np.zeros(3, np.int8), 0)
    v = np.zeros(10, np.int8)
    counts, _ = chunk_counts(v, 4)
    cum = np.concatenate([[0], np.cumsum(counts[:, 0], dtype=np.int64)])
    with pytest.raises(ValueError, match=r"ranks must lie in \[0, 10\)"):
        select_rows(v, 4, cum, 0, np.array([10]))
