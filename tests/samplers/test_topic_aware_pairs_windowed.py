"""TopicAwareBatchSampler's windowed plan WITH a pair table (above EXACT_MAX_ROWS queries; the threshold is lowered
here): side by side with the exact plan (same batch sizes, same cluster in every slot, and every query gets exactly
the exact plan's pair), every query with pairs once per epoch across ranks, queries without pairs left out and
counted, balanced margin-bin shares, exact resume (also in a fresh process over memory-mapped pair arrays), the
pair table kept as memory maps and validated in chunks, the kernels against numpy references, and a DataLoader
with workers over pair rows."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

import samplers.topic_pairs as tp
from native.tas import bin_table, draw_own_pairs, draw_pairs, margin_bins
from native.topic_sort import count_kept_ids, scatter_kept_rows
from samplers import PairTable, PlanWarning, TopicAwareBatchSampler
from samplers.plan_cache import file_identity
from tests.helpers import assert_exactly_once, assert_sampler_resumes_exactly
from tests.samplers.test_topic_aware_windowed import build as build_plain
from tests.samplers.test_topic_aware_windowed import plan_windowed, resume_in_fresh_processes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N = 100_000
CL = np.random.default_rng(0).integers(0, 300, N)  # ~1e5 queries over 300 clusters


def pair_arrays(n: int, seed: int = 1):
    """CSR pairs: 0-6 per query (~1/7 of the queries without pairs), int32 ids, float32 margins, some queries with
    equal margins."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 7, n)
    off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=off[1:])
    p = int(off[-1])
    margin = rng.normal(size=p).astype(np.float32)
    for q in range(0, n, 97):
        margin[off[q] : off[q + 1]] = 0.5
    return off, rng.integers(0, 10**6, p, dtype=np.int32), rng.integers(0, 10**6, p, dtype=np.int32), margin


PAIRS = PairTable(*pair_arrays(N))
NO_PAIRS = int((PAIRS.counts() == 0).sum())


def build(cl, pairs, windowed: bool, **kw) -> TopicAwareBatchSampler:
    return build_plain(cl, windowed, pairs=pairs, **kw)


@pytest.fixture
def windowed(monkeypatch):
    plan_windowed(monkeypatch)


# ---- side by side with the exact plan -------------------------------------------------------------------------
@pytest.mark.parametrize("bs, cpb, world, drop_last, strategy", [(64, 1, 1, False, "balanced"),
                                                                 (37, 3, 4, False, "balanced"),
                                                                 (10, 4, 3, True, "random")])
def test_windowed_pairs_match_the_exact_plan(bs, cpb, world, drop_last, strategy):
    kw = {"batch_size": bs, "clusters_per_batch": cpb, "seed": 11, "world_size": world, "drop_last": drop_last,
          "strategy": strategy}
    for epoch in (0, 1):
        exact = [build(CL, PAIRS, False, rank=r, **kw) for r in range(world)]
        win = [build(CL, PAIRS, True, rank=r, **kw) for r in range(world)]
        for s in exact + win:
            s.set_epoch(epoch)
        be, bw = [list(s) for s in exact], [list(s) for s in win]
        st_e, st_w = exact[0].stats(), win[0].stats()
        assert st_w["dropped"] == st_e["dropped"] and st_w["dropped"]["no_pairs"] == NO_PAIRS
        assert st_w["rows"] == st_e["rows"] and st_w["queries_without_pairs"] == NO_PAIRS
        queries = [[PAIRS.query_of(b) for b in r] for r in bw]
        assert_exactly_once(queries, N, dropped=st_w["dropped_rows"])
        for r in range(world):
            assert [len(b) for b in bw[r]] == [len(b) for b in be[r]]
            qw, qe = PAIRS.query_of(np.concatenate(bw[r])), PAIRS.query_of(np.concatenate(be[r]))
            assert np.array_equal(CL[qw], CL[qe])  # same cluster in every slot
            assert not np.array_equal(qw, qe)  # other queries of it (Feistel, not Fisher-Yates)
        # every query of the epoch gets exactly the pair the exact plan draws for it
        rows_w = np.concatenate([np.concatenate(r) for r in bw])
        rows_e = np.concatenate([np.concatenate(r) for r in be])
        if not drop_last:
            pair_w = dict(zip(PAIRS.query_of(rows_w).tolist(), rows_w.tolist()))
            pair_e = dict(zip(PAIRS.query_of(rows_e).tolist(), rows_e.tolist()))
            assert pair_w == pair_e
        for k in ("topup_batches", "num_clusters", "num_batches", "batches_per_rank"):
            assert st_w[k] == st_e[k], k
        if world == 1:  # the windowed purity describes the batches before they are evened out across ranks
            assert st_w["topic_purity_mean"] == pytest.approx(st_e["topic_purity_mean"], abs=1e-12)


def test_drawn_pairs_are_fresh_each_epoch(windowed):
    a = TopicAwareBatchSampler(CL[:20000], batch_size=64, pairs=PairTable(*pair_arrays(20000)), seed=1)
    first = np.sort(np.concatenate(list(a)))
    a.set_epoch(1)
    second = np.sort(np.concatenate(list(a)))
    assert np.array_equal(a.queries_of(first), a.queries_of(second))  # the same queries...
    assert 0.1 < np.mean(first == second) < 0.6  # ...mostly with other pairs (1-6 pairs each)


# ---- the balanced draw ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy, want", [("balanced", [1 / 3, 1 / 3, 1 / 3]), ("random", [0.2, 0.2, 0.6])])
def test_bin_shares_of_the_drawn_pairs(windowed, strategy, want):
    # every query: 5 pairs with margins in bins 0, 4 and 9 of 10 (1, 1 and 3 pairs)
    nq = 30_000
    per_query = np.array([0.0, 0.45, 1.0, 1.0, 1.0])
    off = np.arange(0, 5 * nq + 1, 5, dtype=np.int64)
    pairs = PairTable(off, np.arange(5 * nq), np.arange(5 * nq), np.tile(per_query, nq))
    cl = np.random.default_rng(3).integers(0, 50, nq)
    s = TopicAwareBatchSampler(cl, batch_size=128, clusters_per_batch=2, pairs=pairs, strategy=strategy, seed=2)
    rows = np.concatenate(list(s))
    slot = rows % 5  # 0 -> bin 0, 1 -> bin 4, 2..4 -> bin 9
    got = np.bincount(np.minimum(slot, 2), minlength=3)
    assert got.sum() == nq
    assert chisquare(got, np.array(want) * nq).pvalue > 1e-4
    if strategy == "balanced":  # inside bin 9, uniform over its three pairs
        assert chisquare(np.bincount(slot[slot >= 2] - 2, minlength=3)).pvalue > 1e-4


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 60), st.integers(1, 12), st.integers(0, 2**63 - 1), st.booleans(), st.booleans())
def test_draw_own_pairs_equals_the_table_draw(nq, num_bins, seed, balanced, float32):
    rng = np.random.default_rng(seed % 2**32)
    counts = rng.integers(1, 9, nq)
    off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    margin = np.round(rng.normal(size=int(off[-1])), 1)  # ties and equal-margin queries
    margin = margin.astype(np.float32) if float32 else margin
    queries = rng.integers(0, nq, 3 * nq)
    table = bin_table(off, margin_bins(off, margin, num_bins), num_bins)
    want = draw_pairs(queries, off, table, seed, balanced=balanced)
    assert np.array_equal(draw_own_pairs(queries, off, margin, num_bins, seed, balanced=balanced), want)


def test_kept_kernels_equal_numpy():
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 40, 5000).astype(np.int32)
    off = np.concatenate([[0], np.cumsum(rng.integers(0, 3, 5000))]).astype(np.int64)
    keep = np.diff(off) > 0
    counts = np.zeros(40, np.int64)
    assert count_kept_ids(ids, off, counts) == keep.sum()
    assert np.array_equal(counts, np.bincount(ids[keep], minlength=40))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    out = np.full(int(keep.sum()), -1, np.int64)
    cursor = offsets[:-1].copy()
    scatter_kept_rows(ids[:2000], off[:2001], 0, np.arange(40), cursor, out)
    scatter_kept_rows(ids[2000:], off[2000:], 2000, np.arange(40), cursor, out)
    rows = np.flatnonzero(keep)
    assert np.array_equal(out, rows[np.argsort(ids[rows], kind="stable")])
    with pytest.raises(ValueError, match=r"offsets must hold len\(ids\) \+ 1 = 5001"):
        count_kept_ids(ids, off[:-1], counts)


# ---- drops and errors -----------------------------------------------------------------------------------------
def test_no_pair_queries_are_counted_and_warned(windowed):
    s = TopicAwareBatchSampler(CL, batch_size=64, pairs=PAIRS)
    with pytest.warns(PlanWarning, match=f"drops {NO_PAIRS} rows .*no_pairs"):
        len(s)
    assert s._index.skipped == NO_PAIRS and len(s._index.rows) == N - NO_PAIRS
    stats = s.stats()
    assert stats["dropped"] == {"no_pairs": NO_PAIRS} and stats["num_pairs"] == PAIRS.num_pairs
    assert json.loads(json.dumps(stats)) == stats
    with pytest.raises(ValueError, match="no_pairs"):
        len(TopicAwareBatchSampler(CL, batch_size=64, pairs=PAIRS, strict=True))


def test_sorted_ids_with_holes_use_a_rows_file(windowed):
    cl = np.sort(CL[:20000])
    pairs = PairTable(*pair_arrays(20000, seed=5))
    s = TopicAwareBatchSampler(cl, batch_size=40, pairs=pairs, seed=4, world_size=2, rank=1)
    assert s._index.rows is not None  # queries without pairs leave holes in the sorted ranges
    other = TopicAwareBatchSampler(cl, batch_size=40, pairs=pairs, seed=4, world_size=2, rank=0)
    every = PairTable(np.arange(20001), np.arange(20000), np.arange(20000), np.zeros(20000))
    full = TopicAwareBatchSampler(cl, batch_size=40, pairs=every, seed=4)
    assert full._index.rows is None and full._index.skipped == 0  # every query has a pair: no file
    batches = [[pairs.query_of(b) for b in r] for r in (list(s), list(other))]
    assert_exactly_once(batches, 20000, dropped=int((pairs.counts() == 0).sum()))


def test_windowed_errors(windowed):
    empty = PairTable(np.zeros(5001, np.int64), [], [], [])
    with pytest.raises(ValueError, match="no query has a pair"):
        TopicAwareBatchSampler(CL[:5000], batch_size=8, pairs=empty)
    with pytest.raises(ValueError, match=r"pairs covers 100000 queries but cluster_ids has 5000"):
        TopicAwareBatchSampler(CL[:5000], batch_size=8, pairs=PAIRS)
    one = np.zeros(5001, np.int64)
    one[1:] = 1  # only query 0 has a pair
    with pytest.raises(ValueError, match=r"world_size=2 is larger than the 1 usable queries"):
        TopicAwareBatchSampler(CL[:5000], batch_size=8, pairs=PairTable(one, [7], [8], [0.1]), world_size=2, rank=0)


# ---- resume ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank, world", [(0, 1), (1, 3)])
def test_windowed_pairs_resume_exactly(windowed, rank, world):
    cl, pairs = CL[:6000], PairTable(*pair_arrays(6000, seed=2))
    assert_sampler_resumes_exactly(lambda: TopicAwareBatchSampler(cl, batch_size=32, clusters_per_batch=2, seed=5,
                                                                  pairs=pairs, rank=rank, world_size=world),
                                   steps=[0, 1, 7, 30, 10**6])


def test_elastic_resume_with_pairs_covers_the_rest_once(windowed):
    cl, pairs = CL[:20000], PairTable(*pair_arrays(20000, seed=6))
    old = [TopicAwareBatchSampler(cl, batch_size=32, pairs=pairs, seed=2, rank=r, world_size=2) for r in range(2)]
    seen = []
    for s in old:
        it = iter(s)
        seen += [next(it) for _ in range(40)]
    new = [TopicAwareBatchSampler(cl, batch_size=32, pairs=pairs, seed=2, rank=r, world_size=3) for r in range(3)]
    for s in new:
        s.load_state_dict(old[0].state_dict())
    rest = [list(s) for s in new]
    assert len({len(r) for r in rest}) == 1
    queries = pairs.query_of(np.concatenate(seen + [b for r in rest for b in r]))
    assert len(queries) == len(np.unique(queries)) == int((pairs.counts() > 0).sum())


def test_state_rejects_other_pairs(windowed):
    a = TopicAwareBatchSampler(CL[:5000], batch_size=8, pairs=PairTable(*pair_arrays(5000, seed=1)))
    b = TopicAwareBatchSampler(CL[:5000], batch_size=8, pairs=PairTable(*pair_arrays(5000, seed=2)))
    with pytest.raises(ValueError, match="other metadata"):
        b.load_state_dict(a.state_dict())


def save_mmap(tmp_path, n, seed=1):
    np.save(tmp_path / "cl.npy", CL[:n].astype(np.int32))
    for name, arr in zip(("offsets", "pos", "neg", "margin"), pair_arrays(n, seed)):
        np.save(tmp_path / f"{name}.npy", arr)


def test_pair_table_keeps_memory_maps_and_checks_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAPIPE_PLAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tp, "CHECK_ROWS", 1000)
    save_mmap(tmp_path, 20000)
    arrs = [np.load(tmp_path / f"{k}.npy", mmap_mode="r") for k in ("offsets", "pos", "neg", "margin")]
    pt = PairTable(*arrs)
    for got, mapped in zip((pt.offsets, pt.pos_id, pt.neg_id, pt.margin), arrs):
        assert np.shares_memory(got, mapped) and file_identity(got) == file_identity(mapped)
        assert got.dtype == mapped.dtype and not got.flags.writeable
    assert pt.pos_id.dtype == np.int32 and pt.margin.dtype == np.float32
    assert len(list((tmp_path / "cache").glob("pair_table_checks-*.npz"))) == 1  # a passed check, remembered
    off = np.array(arrs[0])
    off[12345] = off[12344] - 1
    with pytest.raises(ValueError, match=rf"non-decreasing \(offsets\[12344\]={off[12344]} > offsets\[12345\]"):
        PairTable(off, *arrs[1:])
    mar = np.array(arrs[3])
    mar[[15001, 17003]] = np.nan
    with pytest.raises(ValueError, match=r"margin has NaN/inf at pair row 15001 \(2 rows in all\)"):
        PairTable(arrs[0], arrs[1], arrs[2], mar)


def test_rows_file_is_keyed_by_the_pair_offsets(windowed, tmp_path, monkeypatch):
    monkeypatch.setenv("DATAPIPE_PLAN_CACHE", str(tmp_path / "cache"))
    np.save(tmp_path / "cl.npy", CL[:20000].astype(np.int32))
    ids = np.load(tmp_path / "cl.npy", mmap_mode="r")
    seen = []
    for seed in (1, 2):
        (tmp_path / str(seed)).mkdir()
        for name, arr in zip(("offsets", "pos", "neg", "margin"), pair_arrays(20000, seed)):
            np.save(tmp_path / str(seed) / f"{name}.npy", arr)
        pt = PairTable(*[np.load(tmp_path / str(seed) / f"{k}.npy", mmap_mode="r")
                         for k in ("offsets", "pos", "neg", "margin")])
        s = TopicAwareBatchSampler(ids, batch_size=64, pairs=pt, seed=1)
        keep = np.flatnonzero(np.diff(pt.offsets) > 0)
        rows = np.fromfile(s.stats()["rows_by_cluster"], dtype=np.int32)
        assert np.array_equal(rows, keep[np.argsort(CL[keep], kind="stable")])  # the counting sort of kept rows
        seen.append(s.stats()["rows_by_cluster"])
        assert_exactly_once([[pt.query_of(b) for b in s]], 20000, dropped=20000 - len(keep))
    assert seen[0] != seen[1] and len(list((tmp_path / "cache").glob("topic_rows-*.bin"))) == 2


def test_fresh_process_resume_over_memory_mapped_pairs(tmp_path):
    save_mmap(tmp_path, 50000)
    resume_in_fresh_processes(tmp_path, """
pt = ta.PairTable(*[np.load(f"{d}/{k}.npy", mmap_mode="r") for k in ("offsets", "pos", "neg", "margin")])
s = ta.TopicAwareBatchSampler(np.load(f"{d}/cl.npy", mmap_mode="r"), batch_size=64, clusters_per_batch=2, seed=5,
                              pairs=pt, rank=1, world_size=2)""")


@pytest.mark.slow  # worker processes: ~5 s
def test_loader_over_pair_rows_resumes_exactly(windowed):
    import torch.utils.data as tud

    import datapipe
    from tests.helpers import assert_loader_resumes_exactly

    cl, pairs = CL[:3000], PairTable(*pair_arrays(3000, seed=3))

    class PairRows(tud.Dataset):  # one item per pair row: (query, pos, neg, margin)
        def __len__(self):
            return pairs.num_pairs

        def __getitem__(self, r):
            return int(pairs.query_of([r])[0]), int(pairs.pos_id[r]), int(pairs.neg_id[r]), float(pairs.margin[r])

    def make():
        return datapipe.DataLoader(PairRows(), num_workers=2,
                                   batch_sampler=TopicAwareBatchSampler(cl, batch_size=100, pairs=pairs, seed=1))

    rows = next(iter(TopicAwareBatchSampler(cl, batch_size=100, pairs=pairs, seed=1)))
    query, pos, _, _ = next(iter(make()))  # the loader delivers the sampler's pair rows
    assert np.array_equal(query.numpy(), pairs.query_of(rows)) and np.array_equal(pos.numpy(), pairs.pos_id[rows])
    assert_loader_resumes_exactly(make, steps=[0, 7, 25, 26])
