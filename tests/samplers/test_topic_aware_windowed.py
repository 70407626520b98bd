"""TopicAwareBatchSampler's windowed plan (above EXACT_MAX_ROWS queries, here without pairs; the threshold is lowered
here): side by side with the exact plan (same batch sizes and the same cluster in every slot, so the same purity),
every query exactly once across ranks, equal batch counts, pure batches within clusters_per_batch, top-ups
counted, exact resume (also elastic, and in a fresh process from the on-disk rows-by-cluster file), sorted ids
without a file, errors naming the row and the file, and JSON-able summary stats."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import samplers.topic_aware as ta
import samplers.topic_windowed as tw
from samplers import PairTable, TopicAwareBatchSampler
from samplers.plan_cache import StalePlanCache
from tests.helpers import assert_exactly_once, assert_sampler_resumes_exactly

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CL = np.random.default_rng(0).integers(0, 300, 100_000)  # ~1e5 queries over 300 clusters


def build(cl, windowed: bool, **kw) -> TopicAwareBatchSampler:
    saved = ta.EXACT_MAX_ROWS
    ta.EXACT_MAX_ROWS = 0 if windowed else 1 << 62
    try:
        s = TopicAwareBatchSampler(cl, **kw)
    finally:
        ta.EXACT_MAX_ROWS = saved
    assert s.windowed == windowed
    return s


def plan_windowed(monkeypatch) -> None:
    """Every sampler built in the test plans windowed, with small scan chunks (many chunk boundaries)."""
    monkeypatch.setattr(ta, "EXACT_MAX_ROWS", 0)
    monkeypatch.setattr(tw, "SCAN_ROWS", 4096)


@pytest.fixture
def windowed(monkeypatch):
    plan_windowed(monkeypatch)


@pytest.mark.parametrize("bs, cpb, world, drop_last", [(64, 1, 1, False), (64, 3, 2, False), (5, 4, 3, False),
                                                       (10, 3, 3, True), (37, 2, 8, False)])
def test_windowed_matches_the_exact_plan_slot_for_slot(bs, cpb, world, drop_last):
    kw = {"batch_size": bs, "clusters_per_batch": cpb, "seed": 11, "world_size": world, "drop_last": drop_last}
    for epoch in (0, 1):
        exact = [build(CL, False, rank=r, **kw) for r in range(world)]
        win = [build(CL, True, rank=r, **kw) for r in range(world)]
        for s in exact + win:
            s.set_epoch(epoch)
        be, bw = [list(s) for s in exact], [list(s) for s in win]
        st_e, st_w = exact[0].stats(), win[0].stats()
        assert st_w["dropped"] == st_e["dropped"] and st_w["rows"] == st_e["rows"]
        assert_exactly_once(bw, len(CL), dropped=st_w["dropped_rows"])
        assert len({len(r) for r in bw}) == 1 and len(bw[0]) == len(win[0]) == len(exact[0])
        for r in range(world):  # same sizes, same cluster in every slot; other queries of it
            assert [len(b) for b in bw[r]] == [len(b) for b in be[r]]
            assert np.array_equal(CL[np.concatenate(bw[r])], CL[np.concatenate(be[r])])
        assert not np.array_equal(np.concatenate(bw[0]), np.concatenate(be[0]))
        assert all(b.dtype == np.int64 for r in bw for b in r)
        for k in ("topup_batches", "num_clusters", "num_batches", "batches_per_rank", "min_batch_size"):
            assert st_w[k] == st_e[k], k


def test_summary_stats_equal_the_exact_ones_and_pure_batches_stay_within_the_limit():
    kw = {"batch_size": 48, "clusters_per_batch": 2, "seed": 3}
    exact, win = build(CL, False, **kw), build(CL, True, **kw)
    st_e, st_w = exact.stats(), win.stats()
    for k in ("topic_purity_mean", "topic_purity_min", "clusters_in_batch_max", "batches_over_cluster_limit"):
        assert st_w[k] == pytest.approx(st_e[k], abs=1e-12), k
    assert "topic_purity" not in st_w  # O(batches): summary numbers only above the threshold
    assert json.loads(json.dumps(st_w)) == st_w
    distinct = np.array([len(np.unique(CL[b])) for b in win])
    assert (distinct > 2).sum() == st_w["batches_over_cluster_limit"] <= st_w["topup_batches"]
    assert distinct.max() == st_w["clusters_in_batch_max"]
    assert st_w["plan"] == "windowed" and st_w["rows_by_cluster"] == "temporary"


def test_cluster_order_is_fresh_each_epoch_and_seed(windowed):
    a = TopicAwareBatchSampler(CL, batch_size=64, seed=1)
    first = np.concatenate(list(a))
    a.set_epoch(1)
    assert not np.array_equal(first, np.concatenate(list(a)))
    assert not np.array_equal(first, np.concatenate(list(TopicAwareBatchSampler(CL, batch_size=64, seed=2))))
    assert np.array_equal(first, np.concatenate(list(TopicAwareBatchSampler(CL, batch_size=64, seed=1))))


@pytest.mark.parametrize("rank, world", [(0, 1), (1, 3)])
def test_windowed_resumes_exactly(windowed, rank, world):
    cl = CL[:6000]
    assert_sampler_resumes_exactly(lambda: TopicAwareBatchSampler(cl, batch_size=32, clusters_per_batch=2, seed=5,
                                                                  rank=rank, world_size=world),
                                   steps=[0, 1, 7, 30, 10**6])


def test_elastic_resume_covers_the_rest_of_the_epoch_once(windowed):
    cl = CL[:20000]
    old = [TopicAwareBatchSampler(cl, batch_size=32, seed=2, rank=r, world_size=2) for r in range(2)]
    seen = []
    for s in old:
        it = iter(s)
        seen += [next(it) for _ in range(40)]
    state = old[0].state_dict()
    new = [TopicAwareBatchSampler(cl, batch_size=32, seed=2, rank=r, world_size=3) for r in range(3)]
    for s in new:
        s.load_state_dict(state)
    rest = [list(s) for s in new]
    assert len({len(r) for r in rest}) == 1
    rows = np.concatenate(seen + [b for r in rest for b in r])
    assert len(rows) == len(np.unique(rows)) == len(cl)


def test_sorted_ids_need_no_file_and_give_the_same_clusters(windowed):
    cl = np.sort(CL[:30000])
    s = TopicAwareBatchSampler(cl, batch_size=40, clusters_per_batch=2, seed=4, world_size=2, rank=1)
    assert s._index.rows is None and s.stats()["rows_by_cluster"] == "sorted ids"
    e = build(cl, False, batch_size=40, clusters_per_batch=2, seed=4, world_size=2, rank=1)
    got, want = list(s), list(e)
    assert np.array_equal(cl[np.concatenate(got)], cl[np.concatenate(want)])
    other = TopicAwareBatchSampler(cl, batch_size=40, clusters_per_batch=2, seed=4, world_size=2, rank=0)
    assert_exactly_once([got, list(other)], len(cl))


def test_memory_mapped_ids_are_sorted_once_into_the_plan_cache(windowed, tmp_path, monkeypatch):
    monkeypatch.setenv("DATAPIPE_PLAN_CACHE", str(tmp_path / "cache"))
    np.save(tmp_path / "cl.npy", CL[:20000].astype(np.int32))
    ids = np.load(tmp_path / "cl.npy", mmap_mode="r")
    s = TopicAwareBatchSampler(ids, batch_size=64, seed=1)
    (path,) = (tmp_path / "cache").glob("topic_rows-*.bin")
    assert s.stats()["rows_by_cluster"] == str(path)
    rows = np.fromfile(path, dtype=np.int32)
    assert np.array_equal(rows, np.argsort(CL[:20000], kind="stable"))  # the counting sort, to disk
    assert isinstance(s._index.rows, np.memmap)


def test_pairs_plan_windowed_too(windowed):  # tests/samplers/test_topic_aware_pairs_windowed.py checks them
    off = np.arange(0, 2 * 500 + 1, 2)
    pairs = PairTable(off, np.arange(1000), np.arange(1000), np.linspace(0, 1, 1000))
    s = TopicAwareBatchSampler(CL[:500], batch_size=16, pairs=pairs)
    assert s.windowed and s.stats()["plan"] == "windowed" and "topic_purity" not in s.stats()


@pytest.mark.parametrize("bad, match", [(-3, r"must be >= 0 \(query 777 .*cl\.npy has cluster -3\)"),
                                        (2**31, r"must be <= 2147483647 .*query 777 .*renumber them densely")])
def test_bad_ids_name_the_row_and_the_file(windowed, tmp_path, bad, match):
    cl = CL[:5000].copy()
    cl[777] = bad
    np.save(tmp_path / "cl.npy", cl)
    with pytest.raises(ValueError, match=match):
        TopicAwareBatchSampler(np.load(tmp_path / "cl.npy", mmap_mode="r"), batch_size=8)


def test_state_names_the_windowed_plan(windowed):
    s = TopicAwareBatchSampler(CL[:5000], batch_size=8)
    state = s.state_dict()
    assert state["options"]["plan"] == "windowed"
    exact = build(CL[:5000], False, batch_size=8)
    with pytest.raises(ValueError, match="other options: plan="):
        exact.load_state_dict(state)


#: a fresh interpreter that builds a windowed TopicAwareBatchSampler (``SAMPLER`` lines, with ``d = sys.argv[1]``),
#: then either saves its state after 30 batches with the 31st batch (``save``) or resumes from a saved state file
FRESH_RESUME = """
import json, sys, warnings
import numpy as np
import samplers.topic_aware as ta
warnings.simplefilter("ignore")
ta.EXACT_MAX_ROWS = 0
d = sys.argv[1]
SAMPLER
s.set_epoch(1)
if sys.argv[2] == "save":
    it = iter(s)
    for _ in range(30):
        next(it)
    out = {"state": s.state_dict(), "want": next(it).tolist(), "cached": s._index.cached}
else:
    s.load_state_dict(json.loads(open(sys.argv[2]).read())["state"])
    out = {"got": next(iter(s)).tolist(), "cached": s._index.cached}
print(json.dumps(out))
"""


def resume_in_fresh_processes(tmp_path, sampler: str) -> None:
    """Save in one fresh process, resume in another: the second reads the cached sort and gives the same batch."""
    env = {**os.environ, "DATAPIPE_PLAN_CACHE": str(tmp_path / "cache"), "PYTHONPATH": ROOT}
    run = [sys.executable, "-c", FRESH_RESUME.replace("SAMPLER", sampler), str(tmp_path)]
    first = json.loads(subprocess.run(run + ["save"], env=env, capture_output=True, text=True, check=True,
                                      cwd=ROOT).stdout)
    assert not first["cached"] and len(list((tmp_path / "cache").glob("topic_rows-*.bin"))) == 1
    (tmp_path / "state.json").write_text(json.dumps(first))
    second = json.loads(subprocess.run(run + [str(tmp_path / "state.json")], env=env, capture_output=True,
                                       text=True, check=True, cwd=ROOT).stdout)
    assert second["cached"]  # counts from disk, rows by cluster from the cached file
    assert second["got"] == first["want"]


def test_fresh_process_resume_reads_the_cached_sort(tmp_path):
    np.save(tmp_path / "cl.npy", CL[:50000].astype(np.int32))
    resume_in_fresh_processes(tmp_path, 'ids = np.load(f"{d}/cl.npy", mmap_mode="r")\n'
                                        "s = ta.TopicAwareBatchSampler(ids, batch_size=64, clusters_per_batch=2, "
                                        "seed=5, rank=1, world_size=2)")


def test_damaged_rows_file_is_an_error_naming_it(windowed, tmp_path, monkeypatch):
    monkeypatch.setenv("DATAPIPE_PLAN_CACHE", str(tmp_path / "cache"))
    np.save(tmp_path / "cl.npy", CL[:20000].astype(np.int32))
    ids = np.load(tmp_path / "cl.npy", mmap_mode="r")
    TopicAwareBatchSampler(ids, batch_size=64)
    (path,) = (tmp_path / "cache").glob("topic_rows-*.bin")
    np.arange(20000, dtype=np.int32).tofile(path)  # same size, rows in the wrong clusters
    tw._INDEXES.clear()
    with pytest.raises(StalePlanCache, match=f"rows-by-cluster file {path} does not match"):
        TopicAwareBatchSampler(ids, batch_size=64)
    assert not path.exists()
    s = TopicAwareBatchSampler(ids, batch_size=64)  # sorted again
    assert_exactly_once([list(s)], 20000)


def test_loader_with_workers_resumes_exactly(windowed):
    import torch.utils.data as tud

    import datapipe
    from tests.helpers import assert_loader_resumes_exactly

    class Rows(tud.Dataset):
        def __len__(self):
            return 3000

        def __getitem__(self, i):
            return i

    cl = CL[:3000]

    def make():
        return datapipe.DataLoader(Rows(), batch_sampler=TopicAwareBatchSampler(cl, batch_size=100, seed=1),
                                   num_workers=2)

    assert_loader_resumes_exactly(make, steps=[0, 7, 29, 30])


def test_ranks_starting_together_sort_the_file_once(tmp_path):
    np.save(tmp_path / "cl.npy", CL.astype(np.int32))
    env = {**os.environ, "DATAPIPE_PLAN_CACHE": str(tmp_path / "cache"), "PYTHONPATH": ROOT}
    code = """
import json, sys, warnings
import numpy as np
import samplers.topic_aware as ta
warnings.simplefilter("ignore")
ta.EXACT_MAX_ROWS = 0
r = int(sys.argv[2])
s = ta.TopicAwareBatchSampler(np.load(sys.argv[1], mmap_mode="r"), batch_size=64, seed=2, rank=r, world_size=2)
print(json.dumps({"cached": s._index.cached, "rows": np.concatenate(list(s)).tolist()}))
"""
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "cl.npy"), str(r)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, text=True) for r in range(2)]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert sorted(o["cached"] for o in outs) == [False, True]  # one counted and sorted, the other waited and read
    assert len(list((tmp_path / "cache").glob("topic_rows-*.bin"))) == 1
    rows = np.concatenate([o["rows"] for o in outs])
    assert len(rows) == len(np.unique(rows)) == len(CL)
