"""native.pack_windows: the windowed best-fit-decreasing kernels against their references (``pack_best_fit`` for
the packing, plain numpy for the window's cuts and sorts), and the counting pass against the rows pass."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from native.duration import pack_best_fit
from native.pack_windows import bfd, pack_window_batches, pack_window_sizes
from native.windows import window_blocks


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 400), capacity=st.sampled_from([1.0, 37.5, 600.0, 5000.0]), decimals=st.integers(0, 3),
       max_items=st.sampled_from([None, 1, 3, 50]), seed=st.integers(0, 2**32))
def test_bfd_gives_the_packs_of_pack_best_fit(n, capacity, decimals, max_items, seed):
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.01, capacity, n).round(decimals)  # rounding makes ties and exact fits
    d = np.clip(d, 0.01, capacity)
    order = np.argsort(-d, kind="mergesort")
    idx, off = pack_best_fit(np.arange(n), d, capacity, max_items=max_items)
    pack_of, sizes = bfd(d[order], capacity, max_items=max_items)
    assert sizes.tolist() == np.diff(off).tolist()
    want = np.empty(n, dtype=np.int64)
    want[idx] = np.repeat(np.arange(len(sizes)), sizes)
    assert pack_of.tolist() == want[order].tolist()


def kw(**over):
    out = dict(block=4, per_window=16, permute=True, block_seed=11, prefix=12345, max_duration=50.0,
               window_seconds=200.0, max_cuts=None)
    out.update(over)
    return out


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 700), per_window=st.integers(1, 40), block=st.sampled_from([1, 4, 16]),
       permute=st.booleans(), window_seconds=st.sampled_from([None, 40.0, 300.0]),
       max_cuts=st.sampled_from([None, 2, 7]), f32=st.booleans(), seed=st.integers(0, 2**32))
def test_counting_pass_matches_the_rows_pass(n, per_window, block, permute, window_seconds, max_cuts, f32, seed):
    rng = np.random.default_rng(seed)
    d = rng.lognormal(1.8, 0.8, n).clip(0.1, 60.0).round(rng.integers(1, 4))
    d = d.astype(np.float32) if f32 else d
    k = kw(block=block, per_window=per_window, permute=permute, window_seconds=window_seconds, max_cuts=max_cuts,
           block_seed=seed, prefix=seed + 1)
    nw = -(-n // (block * per_window))
    sizes, stats = pack_window_sizes(d, 0, nw, **k)
    seen = []
    for w in range(nw):
        rows, off = pack_window_batches(d, w, **k)
        assert np.diff(off).tolist() == sizes[w].tolist()
        blocks = window_blocks(w, n, block, per_window, permute, np.uint64(seed))
        members = np.concatenate([np.arange(b * block, min(n, b * block + block)) for b in blocks])
        keep = members[d[members].astype(np.float64) <= 50.0]
        assert sorted(rows.tolist()) == sorted(keep.tolist())  # the window's own cuts, each once
        assert stats[w, 0] == len(members) - len(keep)
        secs = [float(d[rows[a:b]].astype(np.float64).sum()) for a, b in zip(off[:-1], off[1:])]
        assert max(secs, default=0.0) <= 50.0 + 1e-9 and stats[w, 2] == pytest.approx(max(secs, default=0.0))
        assert stats[w, 1] == pytest.approx(sum(secs))
        assert max_cuts is None or np.diff(off).max(initial=0) <= max_cuts
        for a, b in zip(off[:-1], off[1:]):  # longest first inside a pack
            assert np.all(np.diff(d[rows[a:b]]) <= 0)
        seen += rows.tolist()
    assert len(seen) == len(set(seen))


def test_a_window_is_shuffled_then_packed_by_best_fit_decreasing_per_sub_window():
    rng = np.random.default_rng(3)
    d = rng.uniform(1, 30, 640)
    k = kw(per_window=160, window_seconds=None)
    rows, off = pack_window_batches(d, 0, **k)
    assert len(rows) == 640  # one window holds every cut here
    # no ties among the durations: the window's packs are pack_best_fit's of the same cuts, row for row
    idx, ref_off = pack_best_fit(np.sort(rows), d, 50.0)
    assert off.tolist() == ref_off.tolist() and rows.tolist() == idx.tolist()
    # sub-windows of ~200 s: other seeds (another epoch) give other sub-windows, so other pack-mates
    packs = []
    for seed in (98, 99):
        rows2, off2 = pack_window_batches(d, 0, **kw(per_window=160, block_seed=seed, prefix=seed))
        assert sorted(rows2.tolist()) == list(range(640))
        packs.append({frozenset(rows2[a:b].tolist()) for a, b in zip(off2[:-1], off2[1:])})
    assert len(packs[0] & packs[1]) < 0.1 * len(packs[0])


def test_counting_pass_is_the_same_for_any_thread_count():
    d = np.random.default_rng(0).lognormal(1.8, 0.6, 30_000).clip(0.5, 40).astype(np.float32)
    k = kw(block=16, per_window=64, max_duration=600.0, window_seconds=64 * 600.0)
    nw = -(-len(d) // 1024)
    threads = numba.get_num_threads()
    try:
        got = []
        for t in sorted({1, threads}):
            numba.set_num_threads(t)
            got.append(pack_window_sizes(d, 0, nw, **k))
    finally:
        numba.set_num_threads(threads)
    for sizes, stats in got[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(sizes, got[0][0]))
        assert np.array_equal(stats, got[0][1])  # bitwise, seconds included


@pytest.mark.parametrize("over, match", [(dict(block=0), "block and per_window must be >= 1"),
                                         (dict(max_duration=0.0), "max_duration must be a finite number > 0"),
                                         (dict(max_cuts=0), "max_cuts must be >= 1")])
def test_bad_arguments_name_the_parameter(over, match):
    with pytest.raises(ValueError, match=match):
        pack_window_sizes(np.ones(10), 0, 1, **kw(**over))
    with pytest.raises(ValueError, match="every duration must be <= capacity=1.0"):
        bfd(np.array([2.0]), 1.0)
