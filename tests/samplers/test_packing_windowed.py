"""PackedDurationSampler's windowed plan (above EXACT_MAX_ROWS; forced here on small inputs): the invariants of
the exact plan (every cut at most once per epoch, packs within max_duration / max_cuts, drops counted, equal
batches per rank), the base class's materialised plan of the same packs (also across elastic resumes), exact
resumes, the counting pass kept on disk for a memory map, and pack quality close to the exact plan's."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import samplers.packing as sp
import samplers.packing_windowed as pw
from samplers import PackedDurationSampler
from samplers.plan_cache import StalePlanCache
from tests.helpers import (assert_every_row_accounted, assert_exactly_once, assert_sampler_resumes_exactly,
                           elastic_resume, elastic_segments, lazy_plan_ranks)

pytestmark = pytest.mark.filterwarnings("ignore::samplers.PlanWarning")


@pytest.fixture
def windowed(monkeypatch):
    monkeypatch.setattr(sp, "EXACT_MAX_ROWS", 0)
    monkeypatch.setattr(pw, "WINDOW_ROWS", 1024)


def durations_of(n: int, seed: int = 0, dtype=np.float64) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(1.8, 0.6, n).clip(0.5, 40.0).astype(dtype)


def rows_of(batches) -> list[list[int]]:
    return [b.tolist() for b in batches]


def test_windowed_invariants_on_1e5_cuts(windowed):
    d = durations_of(100_000, 1)
    d[[7, 70_000]] = [700.0, 900.0]  # longer than max_duration: dropped and counted
    w = 3
    ss = [PackedDurationSampler(d, max_duration=40.0 * 15, max_cuts=120, seed=5, rank=r, world_size=w)
          for r in range(w)]
    assert all(s.windowed for s in ss)
    for s in ss:
        s.set_epoch(2)
    batches = [list(s) for s in ss]
    st_ = ss[0].stats()
    assert st_["dropped"] == {"longer_than_max_duration": 2}
    assert_exactly_once(batches, len(d), st_["dropped_rows"])
    for rb in batches:
        for b in rb:
            assert float(d[b].sum()) <= 600.0 + 1e-9 and len(b) <= 120
    assert st_["num_batches"] == sum(map(len, batches)) and st_["batches_per_rank"] == len(batches[0])
    assert st_["plan"] == "windowed" and st_["window_rows"] == 1024
    assert st_["max_pack_duration"] <= 600.0 and st_["fill_fraction"] > 0.85  # ~12 packs per 1,024-cut window
    assert st_["duration"] == pytest.approx(float(d.sum()) - 1600.0)
    assert st_["fill_fraction"] == pytest.approx(st_["duration"] / (600.0 * st_["num_batches"]))
    json.dumps(st_)


@pytest.mark.parametrize("drop_last", [False, True])
def test_windowed_drops_are_counted(windowed, drop_last):
    d = durations_of(20_000, 2)
    d[::997] = 700.0
    ss = [PackedDurationSampler(d, max_duration=600.0, drop_last=drop_last, seed=1, rank=r, world_size=4)
          for r in range(4)]
    batches = [list(s) for s in ss]
    st_ = ss[0].stats()
    assert st_["dropped"]["longer_than_max_duration"] == len(d[::997])
    assert_exactly_once(batches, len(d), st_["dropped_rows"])
    assert drop_last or st_["dropped_rows"] == len(d[::997])
    with pytest.raises(ValueError, match=r"cut 0 lasts 700.000 s > max_duration=600.0 \(21 cuts in all\)"):
        PackedDurationSampler(d, max_duration=600.0, on_long="error")
    with pytest.raises(ValueError, match="21 cuts are longer than max_duration=600.0.*strict=True"):
        PackedDurationSampler(d, max_duration=600.0, strict=True)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 3000), w=st.integers(1, 5), epoch=st.integers(0, 2), drop_last=st.booleans(),
       shuffle=st.booleans(), window_packs=st.sampled_from([None, 1, 4]), max_cuts=st.sampled_from([None, 3]),
       cut=st.lists(st.tuples(st.integers(1, 5), st.integers(0, 4)), max_size=2))
def test_windowed_plan_is_its_materialised_plan(n, w, epoch, drop_last, shuffle, window_packs, max_cuts, cut):
    saved = sp.EXACT_MAX_ROWS, pw.WINDOW_ROWS
    sp.EXACT_MAX_ROWS, pw.WINDOW_ROWS = 0, 256
    try:
        d = durations_of(n, n)
        d[::89] = 70.0  # over max_duration: dropped and counted
        usable = int((d <= 60.0).sum())
        if not drop_last and usable < max([w] + [c[0] for c in cut]):
            return
        make = lambda r, ws: PackedDurationSampler(d, max_duration=60.0, window_packs=window_packs,
                                                   max_cuts=max_cuts, shuffle=shuffle, seed=7, rank=r,
                                                   world_size=ws, drop_last=drop_last)
        segments = elastic_segments(make, epoch, cut)
        seen = []
        for _, _, got in lazy_plan_ranks(make, w, epoch, segments):
            for b in got:
                assert float(d[b].sum()) <= 60.0 + 1e-9 and (max_cuts is None or len(b) <= max_cuts)
            seen += [x for b in got for x in b]
        assert len(seen) == len(set(seen))
        if not segments and not drop_last:
            assert_every_row_accounted(make, w, epoch, seen, n, "longer_than_max_duration", n - usable)
    finally:
        sp.EXACT_MAX_ROWS, pw.WINDOW_ROWS = saved


def test_windowed_resumes_exactly(windowed):
    d = durations_of(6000, 3)
    assert_sampler_resumes_exactly(lambda: PackedDurationSampler(d, max_duration=120.0, window_packs=4, seed=4,
                                                                 rank=1, world_size=3), steps=[0, 1, 9, 10**6])


@pytest.mark.parametrize("old,new", [(2, 3), (4, 2)])
def test_windowed_elastic_resume_delivers_the_rest_exactly_once(windowed, old, new):
    d = durations_of(5000, 4)
    make = lambda r, w: PackedDurationSampler(d, max_duration=100.0, seed=3, rank=r, world_size=w)
    olds, news, consumed, rest = elastic_resume(make, old, new)
    assert len({len(r) for r in rest}) == 1
    seen = np.concatenate(consumed + [b for r in rest for b in r])
    assert len(np.unique(seen)) == len(seen) == len(d)  # every cut exactly once (none dropped here)
    again = make(0, new)
    again.load_state_dict({**news[0].state_dict(), "batches_yielded": 1})
    assert rows_of(again) == rows_of(rest[0][1:])


def test_windowed_and_exact_states_do_not_mix(monkeypatch):
    d = durations_of(3000, 5)
    exact = PackedDurationSampler(d, max_duration=100.0)
    monkeypatch.setattr(sp, "EXACT_MAX_ROWS", 0)
    win = PackedDurationSampler(d, max_duration=100.0)
    assert not exact.windowed and win.windowed and "plan" not in exact._options()
    with pytest.raises(ValueError, match="plan=.windowed. there|plan=.<absent>. there"):
        win.load_state_dict(exact.state_dict())


def test_windowed_reads_a_float32_memmap_and_keeps_the_pass_on_disk(windowed, tmp_path, monkeypatch):
    monkeypatch.setenv("DATAPIPE_PLAN_CACHE", str(tmp_path / "cache"))
    np.save(tmp_path / "d.npy", durations_of(8000, 6, np.float32))
    mm = np.load(tmp_path / "d.npy", mmap_mode="r")
    a = PackedDurationSampler(mm, max_duration=300.0, seed=2, rank=1, world_size=2)
    assert a.durations.dtype == np.float32 and np.shares_memory(a.durations, mm)
    it = iter(a)
    for _ in range(5):
        next(it)
    state, want = a.state_dict(), next(it)
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").glob("*.npz")) == ["packed_duration",
                                                                                      "packed_duration_scan"]
    # a restarted job: nothing in this process's memory, the pass and the scan come from disk
    pw._PASSES._mem.clear()
    pw._SCANS._mem.clear()
    calls = []
    real = pw.pack_window_sizes
    monkeypatch.setattr(pw, "pack_window_sizes", lambda *x, **k: calls.append(1) or real(*x, **k))
    b = PackedDurationSampler(np.load(tmp_path / "d.npy", mmap_mode="r"), max_duration=300.0, seed=2, rank=1,
                              world_size=2)
    b.load_state_dict(state)
    assert next(iter(b)).tolist() == want.tolist() and calls == []
    # a damaged entry is refused naming it, never a wrong plan
    pw._PASSES._mem.clear()
    (entry,) = (tmp_path / "cache").glob("packed_duration-*.npz")
    with np.load(entry) as z:
        saved = {k: z[k] for k in z.files}
    saved["by_window"] = saved["by_window"][::-1].copy()
    np.savez(entry, **saved)
    c = PackedDurationSampler(np.load(tmp_path / "d.npy", mmap_mode="r"), max_duration=300.0, seed=2, rank=1,
                              world_size=2)
    with pytest.raises(StalePlanCache, match="packed_duration-"):
        list(c)


@pytest.mark.parametrize("row, value, match", [(123, np.nan, "durations has NaN/inf at row 123"),
                                               (4567, 0.0, "durations must be > 0: row 4567 has 0.0")])
def test_windowed_bad_durations_name_the_row(windowed, row, value, match):
    d = durations_of(5000, 7)
    d[row] = value
    with pytest.raises(ValueError, match=match):
        PackedDurationSampler(d, max_duration=600.0)


def test_windowed_packs_are_as_full_and_as_random_as_the_exact_ones(windowed, monkeypatch):
    d = durations_of(60_000, 8)
    got = {}
    for name, limit in (("exact", 1 << 62), ("windowed", 0)):
        monkeypatch.setattr(sp, "EXACT_MAX_ROWS", limit)
        monkeypatch.setattr(pw, "WINDOW_ROWS", 16_384)
        s = PackedDurationSampler(d, max_duration=600.0, seed=1)
        fill = s.stats()["fill_fraction"]
        owner = np.empty(len(d), np.int64)
        for i, b in enumerate(s):
            owner[b] = i
        s.set_epoch(1)
        same = [len({int(owner[x]) for x in b}) == 1 for b in s]
        got[name] = (fill, float(np.mean(same)))
    assert got["windowed"][0] > got["exact"][0] - 0.01  # within a point of the exact plan's fill
    assert got["windowed"][1] < 0.05 and got["exact"][1] < 0.05  # packs are new each epoch


@pytest.mark.slow
def test_windowed_by_default_above_the_threshold_on_a_memmap(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAPIPE_PLAN_CACHE", str(tmp_path / "cache"))
    n = sp.EXACT_MAX_ROWS + 123_457
    np.save(tmp_path / "d.npy", durations_of(n, 9, np.float32))
    mm = np.load(tmp_path / "d.npy", mmap_mode="r")
    s = PackedDurationSampler(mm, max_duration=600.0, seed=1, rank=3, world_size=8)
    assert s.windowed and np.shares_memory(s.durations, mm)
    plan = s.global_plan()  # every window packed once
    assert len(plan.indices) == n and len(np.unique(plan.indices)) == n
    sums = np.add.reduceat(mm[plan.indices].astype(np.float64), plan.offsets[:-1])
    assert sums.max() <= 600.0 + 1e-6 and plan.num_batches % 8 == 0
    st_ = s.stats()
    assert st_["fill_fraction"] > 0.98 and st_["num_batches"] == plan.num_batches
    first = [b.tolist() for _, b in zip(range(3), s)]
    assert first == [plan.indices[plan.offsets[b]:plan.offsets[b + 1]].tolist() for b in (3, 11, 19)]
