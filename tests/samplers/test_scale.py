"""Samplers at scale: lazy plans (batch sizes over a stream, rows computed per batch) agree exactly with the
materialised plans of ``BatchSamplerBase`` (also across elastic resumes), and shard-local shuffles."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import samplers
import samplers.random as srandom
from samplers.base import BatchSamplerBase
from tests.helpers import assert_exactly_once, assert_sampler_resumes_exactly

pytestmark = pytest.mark.filterwarnings("ignore::samplers.PlanWarning")


def reference(s, epoch, segments=()):
    """The materialised plan of the base class (``_build_plan`` + even_out/take_batches/regroup_in_order)."""
    s._position(epoch, 0, segments)
    glob, mine = BatchSamplerBase._plans(s)
    return glob, [mine.indices[mine.offsets[b]:mine.offsets[b + 1]].tolist() for b in range(mine.num_batches)]


@pytest.fixture(params=["fisher_yates", "feistel"])
def path(request, monkeypatch):
    if request.param == "feistel":  # the path above EXACT_MAX_ROWS, on small inputs
        monkeypatch.setattr(srandom, "EXACT_MAX_ROWS", 0)
    return request.param


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), bs=st.integers(1, 20), w=st.integers(1, 6), epoch=st.integers(0, 3),
       drop_last=st.booleans(), seed=st.integers(0, 2**40), cut=st.lists(st.tuples(st.integers(1, 6),
                                                                                  st.integers(0, 5)), max_size=2))
def test_random_lazy_plan_is_the_materialised_plan(n, bs, w, epoch, drop_last, seed, cut):
    for exact in (1 << 24, 0):
        srandom.EXACT_MAX_ROWS = exact
        try:
            if not drop_last and n < max([w] + [c[0] for c in cut]):
                continue
            segments, s0 = [], samplers.RandomBatchSampler(n, bs, seed=seed, world_size=w, rank=0,
                                                           drop_last=drop_last)
            for w_old, k in cut:  # a valid chain of elastic segments: each consumes at most what is left
                s0._position(epoch, 0, tuple(segments))
                s0.world_size = w_old
                s0._lazy = None
                k = min(k, len(s0))
                segments.append((w_old, k))
            segments = tuple(segments)
            for r in range(w):
                s = samplers.RandomBatchSampler(n, bs, seed=seed, world_size=w, rank=r, drop_last=drop_last)
                glob, want = reference(s, epoch, segments)
                s._position(epoch, 0, segments)
                got = [b.tolist() for b in s]
                assert got == want and len(s) == len(want)
                lazy = s.global_plan()
                np.testing.assert_array_equal(lazy.indices, glob.indices)
                np.testing.assert_array_equal(lazy.offsets, glob.offsets)
                assert s.stats()["dropped"] == {k: v for k, v in glob.dropped.items() if v}
        finally:
            srandom.EXACT_MAX_ROWS = 1 << 24


def test_small_inputs_keep_the_fisher_yates_plan():
    s = samplers.RandomBatchSampler(50, 7, seed=5)
    want = srandom.permutation(50, s.epoch_seed(0))
    np.testing.assert_array_equal(np.concatenate(list(s)), want)


def test_feistel_path_is_used_above_the_threshold(monkeypatch):
    monkeypatch.setattr(srandom, "EXACT_MAX_ROWS", 10)
    s = samplers.RandomBatchSampler(50, 7, seed=5)
    got = np.concatenate(list(s))
    np.testing.assert_array_equal(got, srandom.feistel_range(0, 50, 50, s.epoch_seed(0)))
    assert not np.array_equal(got, srandom.permutation(50, s.epoch_seed(0)))
    assert s._order is None  # nothing per row was materialised


@pytest.mark.parametrize("w,r", [(1, 0), (3, 1)])
def test_random_feistel_path_resumes_exactly(path, w, r):
    assert_sampler_resumes_exactly(lambda: samplers.RandomBatchSampler(61, 4, seed=2, world_size=w, rank=r),
                                   steps=[0, 1, 3, 5])


def test_billion_rows_plan_in_megabytes():
    s = samplers.RandomBatchSampler(10**9, 1024, seed=1, rank=3, world_size=8)
    first = next(iter(s))
    assert len(first) == 1024 and first.min() >= 0 and first.max() < 10**9 and len(np.unique(first)) == 1024
    assert s._size_plan().sizes.nbytes < 16 * 2**20
    it = iter(s)
    batches = [next(it) for _ in range(101)]
    t = samplers.RandomBatchSampler(10**9, 1024, seed=1, rank=3, world_size=8)
    s2 = samplers.RandomBatchSampler(10**9, 1024, seed=1, rank=3, world_size=8)
    it2 = iter(s2)
    for _ in range(100):
        next(it2)
    t.load_state_dict(s2.state_dict())
    np.testing.assert_array_equal(next(iter(t)), batches[100])
    u = samplers.RandomBatchSampler(10**9, 1024, seed=1, rank=0, world_size=6)  # elastic 8 -> 6
    u.load_state_dict(s2.state_dict())
    assert len(u) * 6 * 1024 >= 10**9 - 100 * 8 * 1024


# ---- shard-local shuffles -------------------------------------------------------------------------------------
def shards(sizes):
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=12), window=st.integers(1, 5),
       bs=st.integers(1, 9), w=st.integers(1, 4), epoch=st.integers(0, 3))
def test_shard_local_covers_every_row_once_and_touches_few_shards(sizes, window, bs, w, epoch):
    off = shards(sizes)
    n = int(off[-1])
    if n < w:
        return
    per_rank = []
    for r in range(w):
        s = samplers.RandomBatchSampler(n, bs, shuffle="shard_local", shard_offsets=off, shard_window=window,
                                        seed=4, world_size=w, rank=r)
        s.set_epoch(epoch)
        per_rank.append(list(s))
    assert_exactly_once(per_rank, n, dropped=s.stats()["dropped_rows"])
    if min(sizes) < bs:
        return
    for b in (b for r in per_rank for b in r):  # windows hold >= bs rows: one window, or two at a boundary
        touched = len(np.unique(np.searchsorted(off, b, side="right") - 1))
        assert touched <= min(len(sizes), 2 * window)


def test_shard_local_mixes_within_windows_only():
    off = shards([100] * 20)
    s = samplers.RandomBatchSampler(2000, 50, shuffle="shard_local", shard_offsets=off, shard_window=4, seed=1)
    rows = np.concatenate(list(s))
    shard = rows // 100
    for k in range(5):  # window k is stream positions [400k, 400k + 400): exactly 4 whole shards, mixed
        part = shard[400 * k: 400 * (k + 1)]
        assert len(np.unique(part)) == 4 and np.all(np.bincount(part)[np.unique(part)] == 100)
        assert not np.all(np.diff(rows[400 * k: 400 * (k + 1)]) > 0)
    s.set_epoch(1)
    assert not np.array_equal(np.concatenate(list(s)), rows)


def test_shard_local_resumes_exactly_and_elastically():
    off = shards([37, 0, 50, 13, 44, 29])
    make = lambda w=2, r=1: samplers.RandomBatchSampler(173, 6, shuffle="shard_local", shard_offsets=off,  # noqa
                                                        shard_window=2, seed=9, world_size=w, rank=r)
    assert_sampler_resumes_exactly(make, steps=[0, 2, 7])
    olds = [make(2, r) for r in range(2)]
    consumed = []
    for s in olds:
        it = iter(s)
        consumed += [next(it) for _ in range(4)]
    news = [make(3, r) for r in range(3)]
    for s in news:
        s.load_state_dict(olds[0].state_dict())
    rest = [b for s in news for b in s]
    seen = np.concatenate(consumed + rest)
    assert sorted(seen.tolist()) == list(range(173))
    with pytest.raises(ValueError, match="shard_window"):
        samplers.RandomBatchSampler(173, 6, shuffle="shard_local", shard_offsets=off, shard_window=3,
                                    seed=9).load_state_dict(olds[0].state_dict())


@pytest.mark.parametrize("kwargs,match", [
    (dict(shuffle="shard_local"), "needs shard_offsets"),
    (dict(shuffle="shard_local", shard_offsets=[0, 5, 9]), "rise from 0 to num_rows=10"),
    (dict(shuffle="shard_local", shard_offsets=[0, 6, 4, 10]), "decreases at shard 1"),
    (dict(shuffle="shard_local", shard_offsets=[0, 10], shard_window=0), "shard_window must be"),
    (dict(shuffle=True, shard_offsets=[0, 10]), "only used with shuffle='shard_local'"),
    (dict(shuffle="local"), "shuffle must be"),
])
def test_shard_local_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        samplers.RandomBatchSampler(10, 2, **kwargs)
