"""DurationBucketSampler with 2D buckets (duration x output tokens) above EXACT_MAX_ROWS: the windowed plan, forced
here on small inputs. Every cut once per epoch across ranks or counted as dropped by reason, every batch one 2D
bucket under its budget, equal steps per rank, the lazy plan equal to the base class's materialised plan (also
across elastic resumes), exact resume (also in a fresh process over memory maps), output lengths read through the
memory map; and the per-cut 2D rule of the window kernel agrees with ``native.duration.assign_buckets_2d``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import samplers.duration as sd
from native.duration import assign_buckets_2d
from native.duration_windows import duration_window_batches, duration_window_sizes
from tests.helpers import (assert_every_row_accounted, assert_sampler_resumes_exactly, elastic_resume,
                           elastic_segments, lazy_plan_ranks)
from tests.samplers.test_duration_scale import durations_of, windowed_plans

pytestmark = pytest.mark.filterwarnings("ignore::samplers.PlanWarning", "ignore::samplers.bins.BinsWarning")
ROOT = str(Path(__file__).resolve().parents[2])


def tokens_of(d, seed=0):
    """Output tokens roughly proportional to duration (2-6 tokens/s), a few outliers at 40 tokens/s."""
    rng = np.random.default_rng(seed + 1)
    tok = (np.asarray(d, np.float64) * rng.uniform(2.0, 6.0, len(d))).astype(np.int32) + 1
    tok[::53] = (np.asarray(d[::53], np.float64) * 40).astype(np.int32)  # fit no sub-bucket of their duration
    return tok


def check_batches(s, d, tok, got, max_duration, quad=None, max_cuts=None):
    """Every batch under the padded budget and within one 2D bucket that holds every cut of it."""
    for b in got:
        b = np.asarray(b)
        m = float(d[b].max())
        assert len(b) * (m if quad is None else m + m * m / quad) <= max_duration + 1e-9
        assert max_cuts is None or len(b) <= max_cuts
        buckets = s.buckets_of(b)
        assert len(set(buckets.tolist())) == 1 and buckets[0] >= 0
        k = int(buckets[0])
        assert float(d[b].max()) <= s.bins[k, 0] and float(tok[b].max()) <= s.bins[k, 1]


def expected_drops(s, d, tok, quad=None, max_duration=60.0):
    """``(too long, outside the 2D bins, promoted)`` over every cut, from the sampler's bins and the exact rule."""
    d64 = d.astype(np.float64)
    usable = sd.cut_cost(d64, quad) <= max_duration
    bucket, promoted = assign_buckets_2d(d64, tok, s.bins, s.strict_2d)
    return int((~usable).sum()), int(((bucket < 0) & usable).sum()), int((promoted & usable).sum())


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 700), w=st.integers(1, 4), epoch=st.integers(0, 2), drop_last=st.booleans(),
       shuffle=st.booleans(), strict_2d=st.booleans(), quad=st.sampled_from([None, 30.0]),
       max_cuts=st.sampled_from([None, 3]), cut=st.lists(st.tuples(st.integers(1, 5), st.integers(0, 4)), max_size=2))
@example(n=700, w=3, epoch=1, drop_last=False, shuffle=True, strict_2d=False, quad=None, max_cuts=None,
         cut=[(2, 3), (4, 0)])
@example(n=500, w=2, epoch=0, drop_last=False, shuffle=True, strict_2d=True, quad=None, max_cuts=None, cut=[])
def test_windowed_2d_plan_is_its_materialised_plan(n, w, epoch, drop_last, shuffle, strict_2d, quad, max_cuts, cut):
    with windowed_plans(64):
        d = durations_of(n, n)
        d[::97] = 90.0  # over the budget: dropped and counted
        tok = tokens_of(d, n)
        make = lambda r, ws: sd.DurationBucketSampler(
            d, max_duration=60.0, num_buckets=3, output_lengths=tok, num_sub_buckets=2, strict_2d=strict_2d,
            quadratic_duration=quad, max_cuts=max_cuts, chunk_batches=2, shuffle=shuffle, seed=7, rank=r,
            world_size=ws, drop_last=drop_last)
        s0 = make(0, 1)
        long_, outside, promoted = expected_drops(s0, d, tok, quad)
        usable = n - long_ - outside
        if not drop_last and usable < max([w] + [c[0] for c in cut]):
            return
        segments = elastic_segments(make, epoch, cut)
        seen, steps = [], []
        for s, glob, got in lazy_plan_ranks(make, w, epoch, segments):
            assert s.windowed and s.is_2d
            gp = s.global_plan()
            assert np.array_equal(gp.indices, glob.indices) and np.array_equal(gp.groups, glob.groups)
            check_batches(s, d, tok, got, 60.0, quad, max_cuts)
            seen += [x for b in got for x in b]
            steps.append([int(s.buckets_of(b)[0]) for b in got])
        assert len(seen) == len(set(seen))
        assert len({len(x) for x in steps}) == 1, "ranks yield different batch counts"
        assert all(len(set(step)) == 1 for step in zip(*steps)), "ranks got different buckets at one step"
        if not segments and not drop_last:
            assert_every_row_accounted(make, w, epoch, seen, n, "outside_2d_bins", outside)
            s1 = make(0, w)
            s1.set_epoch(epoch)
            st_ = s1.stats()
            assert st_["dropped"].get("longer_than_max_duration", 0) == long_
            assert st_["promoted_by_reason"]["to_fit_2d_bins"] == promoted == st_["promoted"]


@pytest.fixture(scope="module")
def big():
    """~1e5 cuts (4 ranks in the tests)."""
    d = durations_of(100_000, 11)
    d[::4999] = 200.0  # over the budget
    tok = tokens_of(d, 11)
    tok[7::10007] = 10**6  # more tokens than any bucket holds: outside the 2D bins even when promoting
    return d, tok


def test_1e5_cuts_every_row_once_or_counted_one_bucket_per_step(big):
    d, tok = big
    with windowed_plans(1 << 11):  # x 3 sub-buckets: windows of 6,144 cuts
        make = lambda r, w: sd.DurationBucketSampler(d, max_duration=120.0, num_buckets=10, output_lengths=tok,
                                                     num_sub_buckets=3, seed=5, rank=r, world_size=w)
        ranks = lazy_plan_ranks(make, 4, 1)
        s = ranks[0][0]
        assert s.windowed and s.num_buckets > 20 and s._num_windows > 10
        long_, outside, promoted = expected_drops(s, d, tok, max_duration=120.0)
        assert long_ > 0 and outside > 0 and promoted > 0  # every rule is exercised
        seen = [x for _, _, got in ranks for b in got for x in b]
        assert_every_row_accounted(make, 4, 1, seen, len(d), "outside_2d_bins", outside)
        assert len({len(got) for _, _, got in ranks}) == 1
        for step in zip(*(got for _, _, got in ranks)):
            assert len({int(s.buckets_of(b)[0]) for b in step}) == 1
        for s_, _, got in ranks:
            check_batches(s_, d, tok, got, 120.0)
        st_ = s.stats()
        json.dumps(st_)
        assert st_["dropped"] == {"longer_than_max_duration": long_, "outside_2d_bins": outside}
        assert st_["promoted"] == promoted and 0 < st_["token_padding_fraction"] < 1
        assert st_["rows"] == sum(len(b) for _, _, got in ranks for b in got)
    # the shared keys and the exact 2D plan's own keys, in the windowed plan's stats too
    exact = sd.DurationBucketSampler(d, max_duration=120.0, num_buckets=10, output_lengths=tok, num_sub_buckets=3,
                                     seed=5, rank=0, world_size=4)
    assert not exact.windowed and set(exact.stats()) <= set(st_)


def test_1e5_cuts_quality_close_to_the_exact_2d_plan(big):
    """Same bins on both sides: padding within a point of the exact plan's, batch sizes within 5 %."""
    d, tok = big
    exact = sd.DurationBucketSampler(d, max_duration=120.0, num_buckets=10, output_lengths=tok, num_sub_buckets=3,
                                     seed=5, world_size=4)
    with windowed_plans(1 << 14):
        win = sd.DurationBucketSampler(d, max_duration=120.0, num_buckets=10, output_lengths=tok,
                                       bucket_bins=exact.bins, seed=5, world_size=4)
    a, b = exact.stats(), win.stats()
    assert b["plan"] == "windowed" and a["dropped"] == b["dropped"]
    assert abs(a["padding_fraction"] - b["padding_fraction"]) < 0.01
    assert abs(a["mean_batch_size"] / b["mean_batch_size"] - 1) < 0.05


def test_windowed_2d_resumes_exactly():
    d = durations_of(2000, 2)
    tok = tokens_of(d, 2)
    with windowed_plans():
        assert_sampler_resumes_exactly(lambda: sd.DurationBucketSampler(
            d, max_duration=120.0, num_buckets=4, output_lengths=tok, seed=3, world_size=2, rank=1),
            steps=[0, 1, 7, 40])


def test_windowed_2d_elastic_resume_delivers_the_rest_exactly_once():
    d = durations_of(1500, 4)
    tok = tokens_of(d, 4)
    with windowed_plans():
        make = lambda r, w: sd.DurationBucketSampler(d, max_duration=90.0, num_buckets=4, output_lengths=tok,
                                                     seed=3, rank=r, world_size=w)
        olds, news, consumed, rest = elastic_resume(make, 2, 3)
        dropped = olds[0].stats()["dropped_rows"]
        assert len({len(r) for r in rest}) == 1
        seen = np.concatenate(consumed + [b for r in rest for b in r])
        assert len(np.unique(seen)) == len(seen) == 1500 - dropped
        for step in zip(*rest):
            assert len({int(news[0].buckets_of(b)[0]) for b in step}) == 1


def test_windowed_2d_reads_memmaps_without_copying(tmp_path):
    d = durations_of(3000, 6)
    np.save(tmp_path / "d.npy", d)
    np.save(tmp_path / "t.npy", tokens_of(d, 6))
    dm, tm = np.load(tmp_path / "d.npy", mmap_mode="r"), np.load(tmp_path / "t.npy", mmap_mode="r")
    with windowed_plans():
        s = sd.DurationBucketSampler(dm, max_duration=100.0, num_buckets=4, output_lengths=tm, seed=1)
        assert s.windowed and s.is_2d and s._options()["plan"] == "windowed"
        assert s.output_lengths.dtype == np.int32 and np.shares_memory(s.output_lengths, tm)
        assert np.shares_memory(s.durations, dm)
        rows = np.concatenate(list(s))
        assert len(np.unique(rows)) == len(rows) == 3000 - s.stats()["dropped_rows"]
        st_ = s.stats()
        real, padded = s.global_plan().padding(np.asarray(dm, np.float64))
        assert st_["duration"] == pytest.approx(real) and st_["padded_duration"] == pytest.approx(padded)
        t, tp = s.global_plan().padding(np.asarray(tm, np.float64))
        assert st_["token_padding_fraction"] == pytest.approx(1 - t / tp)
        assert s.bucket_shapes == [(float(a), float(b)) for a, b in s.bins]


def test_windowed_2d_bad_output_lengths_name_the_row():
    d = durations_of(2000)
    tok = tokens_of(d)
    tok[1234] = -3
    with windowed_plans(), pytest.raises(ValueError, match="output_lengths has a negative value -3 at row 1234"):
        sd.DurationBucketSampler(d, max_duration=100.0, output_lengths=tok)
    with windowed_plans(), pytest.raises(ValueError, match=r"output_lengths must have shape \(2000,\)"):
        sd.DurationBucketSampler(d, max_duration=100.0, output_lengths=tok[:-1])


def test_windowed_2d_strict_refuses_cuts_outside_the_bins():
    d = durations_of(2000)
    with windowed_plans(), pytest.raises(ValueError, match="would drop .* cuts .*outside_2d_bins.*strict=True"):
        sd.DurationBucketSampler(d, max_duration=100.0, output_lengths=tokens_of(d), strict_2d=True, strict=True)


def test_fresh_process_resume_over_memmaps_uses_the_disk_cache(tmp_path):
    d = durations_of(4000, 9)
    np.save(tmp_path / "d.npy", d)
    np.save(tmp_path / "t.npy", tokens_of(d, 9))
    env = {**os.environ, "DATAPIPE_PLAN_CACHE": str(tmp_path / "cache"), "PYTHONPATH": ROOT}
    code = """
import json, sys, warnings
import numpy as np
import samplers.duration as sd
warnings.simplefilter("ignore")
sd.EXACT_MAX_ROWS, sd.WINDOW_ROWS, sd.SAMPLE_ROWS = 0, 256, 500
s = sd.DurationBucketSampler(np.load(sys.argv[1], mmap_mode="r"), max_duration=100.0, num_buckets=4,
                             output_lengths=np.load(sys.argv[2], mmap_mode="r"), seed=5, rank=1, world_size=2)
s.set_epoch(1)
if sys.argv[3] == "save":
    it = iter(s)
    for _ in range(30):
        next(it)
    out = {"state": s.state_dict(), "want": [b.tolist() for b in it]}
else:
    s.load_state_dict(json.loads(open(sys.argv[3]).read())["state"])
    out = {"got": [b.tolist() for b in s], "from_disk": bool(s._tables(1).get("from_disk"))}
print(json.dumps(out))
"""
    run = [sys.executable, "-c", code, str(tmp_path / "d.npy"), str(tmp_path / "t.npy")]
    first = json.loads(subprocess.run(run + ["save"], env=env, capture_output=True, text=True, check=True,
                                      cwd=ROOT).stdout)
    assert len(first["want"]) > 10 and list((tmp_path / "cache").glob("duration-*.npz"))
    (tmp_path / "state.json").write_text(json.dumps(first))
    second = json.loads(subprocess.run(run + [str(tmp_path / "state.json")], env=env, capture_output=True,
                                       text=True, check=True, cwd=ROOT).stdout)
    assert second["from_disk"] and second["got"] == first["want"]


def test_exact_2d_below_the_threshold():
    d = durations_of(500)
    with windowed_plans():
        sd.EXACT_MAX_ROWS = 10_000
        s = sd.DurationBucketSampler(d, max_duration=100.0, output_lengths=tokens_of(d))
        assert not s.windowed and s.is_2d and s.bucket_of is not None and "plan" not in s._options()


# ---- kernels ---------------------------------------------------------------------------------------------------
def test_2d_window_kernel_counting_pass_agrees_with_rows():
    """The counting pass and the row pass of 2D windows give the same sizes and buckets; every cut is in one batch
    or counted (too long, outside the bins), and each batch's cuts have the batch's bucket."""
    d = durations_of(3000, 3)
    d[::211] = 90.0
    tok = tokens_of(d, 3)
    bins = np.array([[8.0, 30.0], [8.0, 60.0], [16.0, 60.0], [16.0, 100.0], [40.0, 200.0]])
    for strict in (False, True):
        kw = dict(block=16, per_window=16, bins=bins, max_duration=60.0, quadratic_duration=None,
                  chunk_rows=np.full(5, 8), caps=np.full(5, 1 << 40), block_seed=3, prefix=4, permute=True,
                  output_lengths=tok, strict_2d=strict)
        nw = -(-3000 // 256)
        sizes, groups, stats = duration_window_sizes(d, 0, nw, **kw)
        seen = []
        for w in range(nw):
            rows, off, g = duration_window_batches(d, w, **kw)
            assert np.diff(off).tolist() == sizes[w].tolist() and g.tolist() == groups[w].tolist()
            want = assign_buckets_2d(d[rows], tok[rows], bins, strict)[0]
            assert want.tolist() == np.repeat(g, np.diff(off)).tolist()
            seen += rows.tolist()
        b, p = assign_buckets_2d(d, tok, bins, strict)
        fits = d <= 60.0
        assert sorted(seen) == np.flatnonzero(fits & (b >= 0)).tolist()
        assert int(stats[:, 0].sum()) == int((~fits).sum())
        assert int(stats[:, 5].sum()) == int((fits & (b < 0)).sum()) > 0
        assert int(stats[:, 6].sum()) == int((fits & p).sum()) and (strict or stats[:, 6].sum() > 0)
