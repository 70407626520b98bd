"""Samplers at scale: lazy plans (batch sizes over a stream, rows computed per batch) agree exactly with the
materialised plans of ``BatchSamplerBase`` (also across elastic resumes), and shard-local shuffles."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import samplers
import samplers.random as srandom
from tests.helpers import (assert_every_row_accounted, assert_exactly_once, assert_sampler_resumes_exactly,
                           elastic_segments, lazy_plan_ranks, materialised)

pytestmark = pytest.mark.filterwarnings("ignore::samplers.PlanWarning")


@pytest.fixture(params=["fisher_yates", "feistel"])
def path(request, monkeypatch):
    if request.param == "feistel":  # the path above EXACT_MAX_ROWS, on small inputs
        monkeypatch.setattr(srandom, "EXACT_MAX_ROWS", 0)
    return request.param


@settings(max_examples=25, deadline=None)
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
                glob, want = materialised(s, epoch, segments)
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


# ---- windowed token-budget plans (above EXACT_MAX_ROWS; forced here on small inputs) ---------------------------
@pytest.fixture
def windowed(monkeypatch):
    import samplers.token_budget as tb

    monkeypatch.setattr(tb, "EXACT_MAX_ROWS", 0)
    monkeypatch.setattr(tb, "WINDOW_ROWS", 64)


def lengths_of(n, seed=0):
    return np.random.default_rng(seed).integers(1, 60, n).astype(np.int32)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 600), w=st.integers(1, 5), epoch=st.integers(0, 2), drop_last=st.booleans(),
       shuffle=st.booleans(), cut=st.lists(st.tuples(st.integers(1, 5), st.integers(0, 4)), max_size=2))
def test_token_budget_windowed_plan_is_its_materialised_plan(n, w, epoch, drop_last, shuffle, cut):
    import samplers.token_budget as tb

    saved = tb.EXACT_MAX_ROWS, tb.WINDOW_ROWS
    tb.EXACT_MAX_ROWS, tb.WINDOW_ROWS = 0, 64
    try:
        lengths = lengths_of(n, n)
        lengths[::97] = 300  # too long: dropped and counted
        usable = int((lengths <= 200).sum())
        if not drop_last and usable < max([w] + [c[0] for c in cut]):
            return
        make = lambda r, ws: tb.TokenBudgetBatchSampler(lengths, 200, sort_window=8, shuffle=shuffle,  # noqa
                                                        seed=7, world_size=ws, rank=r, drop_last=drop_last)
        segments = elastic_segments(make, epoch, cut)
        seen = []
        for s, _, got in lazy_plan_ranks(make, w, epoch, segments):
            assert s.windowed
            for b in got:
                assert len(b) * lengths[b].max() <= 200
            seen += [x for b in got for x in b]
        assert len(seen) == len(set(seen))
        if not segments and not drop_last:
            assert_every_row_accounted(make, w, epoch, seen, n, "longer_than_max_tokens", n - usable)
    finally:
        tb.EXACT_MAX_ROWS, tb.WINDOW_ROWS = saved


def test_token_budget_windowed_resumes_exactly(windowed):
    lengths = lengths_of(500)
    assert_sampler_resumes_exactly(lambda: samplers.TokenBudgetBatchSampler(lengths, 200, sort_window=8, seed=3,
                                                                            world_size=2, rank=1),
                                   steps=[0, 1, 5, 20])


def test_token_budget_windowed_stats_match_the_rows(windowed):
    lengths = lengths_of(3000)
    s = samplers.TokenBudgetBatchSampler(lengths, 256, sort_window=8, seed=1)
    st_ = s.stats()
    plan = s.global_plan()
    real, padded = plan.padding(lengths.astype(np.int64))
    assert (st_["tokens"], st_["padded_tokens"]) == (int(real), int(padded))
    assert st_["plan"] == "windowed" and st_["num_batches"] == plan.num_batches
    s.set_epoch(1)
    assert not np.array_equal(s.global_plan().indices, plan.indices)  # a new block permutation each epoch


def test_token_budget_windowed_reads_an_int32_memmap_without_copying(windowed, tmp_path):
    np.save(tmp_path / "len.npy", lengths_of(2000))
    mm = np.load(tmp_path / "len.npy", mmap_mode="r")
    s = samplers.TokenBudgetBatchSampler(mm, 256, sort_window=8)
    assert s.lengths.dtype == np.int32 and np.shares_memory(s.lengths, mm)
    assert sorted(np.concatenate(list(s)).tolist()) == list(range(2000))
    bad = lengths_of(2000)
    bad[1234] = -3
    with pytest.raises(ValueError, match="lengths has a negative value -3 at row 1234"):
        samplers.TokenBudgetBatchSampler(bad, 256)
    long = lengths_of(2000)
    long[77] = 999
    with pytest.raises(ValueError, match="row 77 has length 999 > max_tokens=256"):
        samplers.TokenBudgetBatchSampler(long, 256, on_long="error")


def test_token_budget_exact_path_below_the_threshold():
    s = samplers.TokenBudgetBatchSampler(lengths_of(500), 200, sort_window=8)
    assert not s.windowed and "plan" not in s._options()


def test_token_budget_windowed_samplers_share_a_counting_pass(windowed, monkeypatch):
    import samplers.token_budget as tb

    lengths = lengths_of(1500, 5)
    a = tb.TokenBudgetBatchSampler(lengths, 256, sort_window=8, seed=21, world_size=2, rank=0)
    it = iter(a)
    for _ in range(3):
        next(it)
    calls = []
    real = tb.window_sizes
    monkeypatch.setattr(tb, "window_sizes", lambda *x, **k: calls.append(1) or real(*x, **k))
    b = tb.TokenBudgetBatchSampler(lengths, 256, sort_window=8, seed=21, world_size=2, rank=0)
    b.load_state_dict(a.state_dict())
    assert calls == [] and next(iter(b)).tolist() == next(it).tolist()
    c = tb.TokenBudgetBatchSampler(lengths, 256, sort_window=8, seed=22, world_size=2, rank=0)  # another seed
    assert calls and len(c) > 0
    other = lengths.copy()
    other[::2] = 7  # other lengths: another digest, another pass
    calls.clear()
    tb.TokenBudgetBatchSampler(other, 256, sort_window=8, seed=21, world_size=2, rank=0)
    assert calls
