"""DurationBucketSampler above EXACT_MAX_ROWS (windowed plans, forced here on small inputs): the lazy plan is the
base class's materialised plan of the same batches (also across elastic resumes), resumes exactly, keeps
same-bucket steps, reads a float32 memory map without copying it; and the window kernel agrees with a plain
numpy reference."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import samplers.duration as sd
from native.duration import duration_window_batches, duration_window_sizes
from tests.helpers import (assert_every_row_accounted, assert_sampler_resumes_exactly, elastic_resume,
                           elastic_segments, lazy_plan_ranks)

pytestmark = pytest.mark.filterwarnings("ignore::samplers.PlanWarning", "ignore::samplers.bins.BinsWarning")


@contextlib.contextmanager
def windowed_plans(window_rows=256):
    saved = sd.EXACT_MAX_ROWS, sd.WINDOW_ROWS, sd.SAMPLE_ROWS
    sd.EXACT_MAX_ROWS, sd.WINDOW_ROWS, sd.SAMPLE_ROWS = 0, window_rows, 500
    try:
        yield
    finally:
        sd.EXACT_MAX_ROWS, sd.WINDOW_ROWS, sd.SAMPLE_ROWS = saved


@pytest.fixture
def windowed():
    with windowed_plans():
        yield


def durations_of(n, seed=0):
    return np.random.default_rng(seed).gamma(4.0, 3.3, n).clip(0.5, 40).astype(np.float32)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 700), w=st.integers(1, 4), epoch=st.integers(0, 2), drop_last=st.booleans(),
       shuffle=st.booleans(), quad=st.sampled_from([None, 30.0]), max_cuts=st.sampled_from([None, 3]),
       cut=st.lists(st.tuples(st.integers(1, 5), st.integers(0, 4)), max_size=2))
@example(n=11, w=1, epoch=1, drop_last=False, shuffle=True, quad=None, max_cuts=None, cut=[(1, 0), (1, 0)])
@example(n=700, w=3, epoch=1, drop_last=False, shuffle=True, quad=None, max_cuts=None, cut=[(2, 3), (4, 0)])
def test_windowed_plan_is_its_materialised_plan(n, w, epoch, drop_last, shuffle, quad, max_cuts, cut):
    with windowed_plans(64):
        d = durations_of(n, n)
        d[::97] = 90.0  # over the budget: dropped and counted
        make = lambda r, ws: sd.DurationBucketSampler(d, max_duration=60.0, num_buckets=5, quadratic_duration=quad,
                                                      max_cuts=max_cuts, chunk_batches=2, shuffle=shuffle, seed=7,
                                                      rank=r, world_size=ws, drop_last=drop_last)
        usable = int((sd.cut_cost(d.astype(np.float64), quad) <= 60.0).sum())
        if not drop_last and usable < max([w] + [c[0] for c in cut]):
            return
        segments = elastic_segments(make, epoch, cut)
        seen = []
        steps = []
        for s, glob, got in lazy_plan_ranks(make, w, epoch, segments):
            assert s.windowed
            gp = s.global_plan()
            assert np.array_equal(gp.indices, glob.indices) and np.array_equal(gp.groups, glob.groups)
            for b in got:
                m = float(d[b].max())
                assert len(b) * (m if quad is None else m + m * m / quad) <= 60.0 + 1e-9
                assert max_cuts is None or len(b) <= max_cuts
            seen += [x for b in got for x in b]
            steps.append([int(s.buckets_of(b)[0]) for b in got])
        assert len(seen) == len(set(seen))
        assert all(len(set(step)) == 1 for step in zip(*steps)), "ranks got different buckets at one step"
        if not segments and not drop_last:
            assert_every_row_accounted(make, w, epoch, seen, n, "longer_than_max_duration", n - usable)


def test_windowed_resumes_exactly(windowed):
    d = durations_of(2000)
    assert_sampler_resumes_exactly(lambda: sd.DurationBucketSampler(d, max_duration=120.0, num_buckets=6, seed=3,
                                                                    world_size=2, rank=1), steps=[0, 1, 7, 40])


@pytest.mark.parametrize("old,new", [(2, 3), (4, 2)])
def test_windowed_elastic_resume_delivers_the_rest_exactly_once(windowed, old, new):
    d = durations_of(1500, 4)
    make = lambda r, w: sd.DurationBucketSampler(d, max_duration=90.0, num_buckets=6, seed=3, rank=r,
                                                 world_size=w)
    olds, news, consumed, rest = elastic_resume(make, old, new)
    assert len({len(r) for r in rest}) == 1
    seen = np.concatenate(consumed + [b for r in rest for b in r])
    assert len(np.unique(seen)) == len(seen) == 1500  # every row exactly once (none dropped here)
    for step in zip(*rest):
        assert len({int(news[0].buckets_of(b)[0]) for b in step}) == 1
    again = make(0, new)
    again.load_state_dict({**news[0].state_dict(), "batches_yielded": 1})
    assert [b.tolist() for b in again] == [b.tolist() for b in rest[0][1:]]


def test_windowed_reads_a_float32_memmap_without_copying(windowed, tmp_path):
    np.save(tmp_path / "d.npy", durations_of(3000))
    mm = np.load(tmp_path / "d.npy", mmap_mode="r")
    s = sd.DurationBucketSampler(mm, max_duration=100.0, num_buckets=8, seed=1)
    assert s.windowed and s.durations.dtype == np.float32 and np.shares_memory(s.durations, mm)
    assert s._options()["plan"] == "windowed"
    assert sorted(np.concatenate(list(s)).tolist()) == list(range(3000))
    st_ = s.stats()
    real, padded = s.global_plan().padding(mm.astype(np.float64))
    assert st_["duration"] == pytest.approx(real) and st_["padded_duration"] == pytest.approx(padded)
    assert sum(st_["cuts_per_bucket"]) == 3000 and len(s.bucket_shapes) == s.num_buckets
    s.set_epoch(1)
    first = s.global_plan().indices
    s.set_epoch(2)
    assert not np.array_equal(s.global_plan().indices, first)  # a new block permutation each epoch


@pytest.mark.parametrize("row,value,match", [(1234, np.nan, "durations has NaN/inf at row 1234"),
                                             (77, 0.0, "durations must be > 0: row 77 has 0.0"),
                                             (5, -2.0, "durations must be > 0: row 5 has -2.0")])
def test_windowed_bad_durations_name_the_row(windowed, row, value, match):
    d = durations_of(2000)
    d[row] = value
    with pytest.raises(ValueError, match=match):
        sd.DurationBucketSampler(d, max_duration=100.0)


def test_windowed_on_long_error_names_the_cut(windowed):
    d = durations_of(2000)
    d[321] = 500.0
    with pytest.raises(ValueError, match="cut 321 lasts 500.000 s, over max_duration=100.0"):
        sd.DurationBucketSampler(d, max_duration=100.0, on_long="error")


def test_exact_path_below_the_threshold_only(windowed):
    sd.EXACT_MAX_ROWS = 10_000
    s = sd.DurationBucketSampler(durations_of(500), max_duration=100.0, num_buckets=4)
    assert not s.windowed and "plan" not in s._options() and s.bucket_of is not None
    sd.EXACT_MAX_ROWS = 0
    t = sd.DurationBucketSampler(durations_of(500), max_duration=100.0, output_lengths=np.arange(500) % 50 + 1)
    assert t.windowed and t.is_2d  # 2D buckets are windowed above the threshold too (test_duration2d_scale.py)


# ---- kernels ---------------------------------------------------------------------------------------------------
def reference_window(d, w, window_rows, bins, max_duration, chunk_rows):
    """Plain numpy: window ``w`` without permutation (rows in order), filtered, grouped by bucket (stable), sorted
    in chunks (up, down, ...), cut greedily under ``n * max <= max_duration``."""
    rows = np.arange(w * window_rows, min(len(d), (w + 1) * window_rows))
    rows = rows[d[rows].astype(np.float64) <= max_duration]
    b = np.searchsorted(bins, d[rows].astype(np.float64), side="left")
    sizes, groups, out = [], [], []
    for k in range(len(bins) + 1):
        seg = rows[b == k]
        if not len(seg):
            continue
        c = int(chunk_rows[k])
        parts = []
        for i, cs in enumerate(range(0, len(seg), max(c, 1))):
            chunk = seg[cs:cs + max(c, 1)]
            key = d[chunk].astype(np.float64)
            parts.append(chunk[np.argsort(key if i % 2 == 0 or c <= 1 else -key, kind="stable")] if c > 1 else chunk)
        seg = np.concatenate(parts)
        n, top = 0, 0.0
        for r in seg:
            m = max(top, float(d[r]))
            if n and (n + 1) * m > max_duration:
                sizes.append(n)
                groups.append(k)
                n, m = 0, float(d[r])
            n, top = n + 1, m
        sizes.append(n)
        groups.append(k)
        out.append(seg)
    return np.concatenate(out) if out else np.zeros(0, np.int64), np.array(sizes), np.array(groups)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 900), chunk=st.integers(1, 40), seed=st.integers(0, 2**32))
def test_window_kernel_matches_numpy_reference(n, chunk, seed):
    d = durations_of(n, seed % 1000)
    d[::13] = 70.0
    bins = np.array([5.0, 10.0, 15.0, 20.0])
    chunk_rows = np.full(5, chunk)
    kw = dict(block=16, per_window=8, bins=bins, max_duration=60.0, quadratic_duration=None,
              chunk_rows=chunk_rows, caps=np.full(5, 1 << 40), block_seed=seed, prefix=seed + 1)
    nw = -(-n // 128)
    sizes, groups, stats = duration_window_sizes(d, 0, nw, permute=False, **kw)
    for w in range(nw):
        rows, off, g = duration_window_batches(d, w, permute=False, **kw)
        want_rows, want_sizes, want_groups = reference_window(d, w, 128, bins, 60.0, chunk_rows)
        assert rows.tolist() == want_rows.tolist()
        assert np.diff(off).tolist() == want_sizes.tolist() == sizes[w].tolist()
        assert g.tolist() == want_groups.tolist() == groups[w].tolist()
    # permuted: the counting pass (durations only) and the row pass agree, and every usable row comes once
    sizes, groups, stats = duration_window_sizes(d, 0, nw, permute=True, **kw)
    seen = []
    for w in range(nw):
        rows, off, g = duration_window_batches(d, w, permute=True, **kw)
        assert np.diff(off).tolist() == sizes[w].tolist() and g.tolist() == groups[w].tolist()
        seen += rows.tolist()
    assert sorted(seen) == np.flatnonzero(d <= 60.0).tolist()
    assert int(stats[:, 0].sum()) == int((d > 60.0).sum())


# ---- parts: group_steps / regroup_in_order on (source batch, offset, size) ---------------------------------------
def rows_of(parts, plan):
    g = parts.grouped_index(np.arange(parts.num_batches))
    return [plan.indices[plan.offsets[s] + a: plan.offsets[s] + a + z].tolist()
            for s, a, z in zip(parts.src[g].tolist(), parts.a[g].tolist(), parts.size[g].tolist())]


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 9), max_size=40), groups=st.data(), w=st.integers(1, 5),
       drop_last=st.booleans(), seed=st.integers(0, 99), skip=st.integers(0, 12))
def test_arrange_parts_is_group_steps_and_regroup_in_order(sizes, groups, w, drop_last, seed, skip):
    from samplers.grouped_lazy_plan import arrange_parts
    from samplers.plan import Plan, group_steps, regroup_in_order, take_batches

    g = np.array(groups.draw(st.lists(st.integers(0, 3), min_size=len(sizes), max_size=len(sizes))), dtype=np.int16)
    sizes = np.array(sizes, dtype=np.int32)
    plan = Plan.from_sizes(np.random.default_rng(seed).permutation(int(sizes.sum())), sizes, groups=g.astype(np.int64))
    try:
        want = group_steps(plan, w, drop_last, seed=seed)
    except ValueError:  # too few rows to split: both refuse alike
        with pytest.raises(ValueError):
            arrange_parts(None, None, sizes, g, w, drop_last, {}, step_seed=seed)
        return
    got = arrange_parts(None, None, sizes, g, w, drop_last, {}, step_seed=seed)
    assert rows_of(got, plan) == [want.indices[a:b].tolist() for a, b in zip(want.offsets[:-1], want.offsets[1:])]
    assert got.dropped == want.dropped
    # the rest after `skip` steps, regrouped for another world size in time order
    k = min(skip, want.num_batches // w) * w
    rest_want = regroup_in_order(take_batches(want, np.arange(k, want.num_batches)), w + 1, drop_last)
    rest = got.skip(k)
    again = arrange_parts(rest.src, rest.a, rest.size, g[rest.src], w + 1, drop_last, rest.dropped, in_time=True)
    assert rows_of(again, plan) == [rest_want.indices[a:b].tolist()
                                    for a, b in zip(rest_want.offsets[:-1], rest_want.offsets[1:])]
    assert again.dropped == rest_want.dropped


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 9), max_size=40), groups=st.data(), w=st.integers(1, 5),
       drop_last=st.booleans(), seed=st.integers(0, 99))
def test_step_order_hook_sees_each_steps_source_batch_on_both_paths(sizes, groups, w, drop_last, seed):
    """group_steps' order_steps hook gets the source batch of each step's first batch, and arrange_parts (the lazy
    path) calls it with the same sources, so both paths lay the steps out in one order."""
    from native.rng import permutation
    from samplers.grouped_lazy_plan import arrange_parts
    from samplers.plan import Plan, group_steps

    g = np.array(groups.draw(st.lists(st.integers(0, 3), min_size=len(sizes), max_size=len(sizes))), dtype=np.int16)
    sizes = np.array(sizes, dtype=np.int32)
    plan = Plan.from_sizes(np.random.default_rng(seed).permutation(int(sizes.sum())), sizes, groups=g.astype(np.int64))
    seen = {}

    def hook(first, path):
        seen[path] = first.tolist()
        return permutation(len(first), seed)[::-1].copy()

    try:
        got = group_steps(plan, w, drop_last, order_steps=lambda f: hook(f, "materialised"))
    except ValueError:  # too few rows to split
        return
    lazy = arrange_parts(None, None, sizes, g, w, drop_last, {}, order_steps=lambda f: hook(f, "lazy"))
    assert seen.get("materialised") == seen.get("lazy")  # neither calls it for an empty plan
    assert rows_of(lazy, plan) == [got.indices[a:b].tolist() for a, b in zip(got.offsets[:-1], got.offsets[1:])]
    bare = group_steps(plan, w, drop_last)  # the grouped order the hook's sources index
    for s, src in enumerate(seen.get("materialised", [])):
        first_row = bare.indices[bare.offsets[s * w]]
        assert first_row in plan.indices[plan.offsets[src]:plan.offsets[src + 1]]
        assert bare.groups[s * w] == plan.groups[src]
