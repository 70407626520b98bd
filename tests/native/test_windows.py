"""native.windows: windowed token-budget plans (block permutation, in-window shuffle, sorted chunks, cuts)."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from native.batching import budget_cuts
from native.feistel import feistel_permute
from native.windows import window_batches, window_sizes


def kw(**over):
    out = dict(block=4, per_window=5, permute=True, block_seed=11, prefix=12345, sort_window=6, max_tokens=100)
    out.update(over)
    return out


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), block=st.integers(1, 8), per_window=st.integers(1, 6), sort_window=st.integers(1, 9),
       permute=st.booleans(), seed=st.integers(0, 2**40))
def test_windows_partition_the_rows_and_counts_match_rows(n, block, per_window, sort_window, permute, seed):
    lengths = np.random.default_rng(seed).integers(1, 130, n).astype(np.int32)
    k = kw(block=block, per_window=per_window, sort_window=sort_window, permute=permute, block_seed=seed)
    nblocks = -(-n // block)
    nw = -(-nblocks // per_window)
    blocks = feistel_permute(np.arange(nblocks), nblocks, seed) if permute and nblocks > 1 else np.arange(nblocks)
    sizes, stats = window_sizes(lengths, 0, nw, **k)
    seen = []
    for w in range(nw):
        rows, cuts = window_batches(lengths, w, **k)
        mine = blocks[w * per_window:(w + 1) * per_window]
        want = np.concatenate([np.arange(b * block, min(n, (b + 1) * block)) for b in mine])
        assert sorted(rows.tolist()) == sorted(want[lengths[want] <= 100].tolist())
        for c0 in range(0, len(rows), sort_window):  # chunks sorted by length
            assert np.all(np.diff(lengths[rows[c0:c0 + sort_window]]) >= 0)
        np.testing.assert_array_equal(cuts, budget_cuts(lengths[rows], 100))
        np.testing.assert_array_equal(sizes[w], np.diff(cuts))
        lens = lengths[rows].astype(np.int64)
        padded = sum(int(lens[a:b].max()) * (b - a) for a, b in zip(cuts[:-1], cuts[1:]))
        assert stats[w].tolist() == [int((lengths[want] > 100).sum()), int(lens.sum()), padded]
        seen += rows.tolist()
    assert sorted(seen) == np.flatnonzero(lengths <= 100).tolist()


def test_counting_pass_is_the_same_for_any_thread_count():
    lengths = np.random.default_rng(0).integers(1, 130, 5000).astype(np.int32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = window_sizes(lengths, 0, 60, **kw())
        numba.set_num_threads(max(1, numba.config.NUMBA_NUM_THREADS))
        many = window_sizes(lengths, 0, 60, **kw())
    finally:
        numba.set_num_threads(before)
    assert all(np.array_equal(a, b) for a, b in zip(one[0], many[0]))
    np.testing.assert_array_equal(one[1], many[1])


def test_in_window_order_changes_with_the_seed():
    lengths = np.random.default_rng(0).integers(1, 130, 400).astype(np.int32)
    a, _ = window_batches(lengths, 0, **kw(sort_window=1, prefix=1))
    b, _ = window_batches(lengths, 0, **kw(sort_window=1, prefix=2))
    assert sorted(a.tolist()) == sorted(b.tolist()) and a.tolist() != b.tolist()


def test_bad_arguments():
    with pytest.raises(ValueError, match="must be >= 1"):
        window_sizes(np.ones(4, np.int32), 0, 1, **kw(block=0))
