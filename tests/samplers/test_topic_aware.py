"""TopicAwareBatchSampler and PairTable: exactly once across ranks, cluster limits, balanced margin draws,
equal margins, exact resume, bad input, and a real FAISS -> sampler pipeline."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

import native
from samplers import PairTable, TopicAwareBatchSampler
from tests.helpers import assert_exactly_once, assert_sampler_resumes_exactly


def clusters(n, c, seed=0):
    return np.random.default_rng(seed).integers(0, c, n)


def pair_table(nq, seed=0, max_pairs=12, min_pairs=0):
    rng = np.random.default_rng(seed)
    counts = rng.integers(min_pairs, max_pairs + 1, nq)
    off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    p = int(off[-1])
    return PairTable(off, rng.integers(0, 10**6, p), rng.integers(0, 10**6, p), rng.normal(size=p))


def run_all_ranks(world, **kw):
    out = []
    for r in range(world):
        s = TopicAwareBatchSampler(rank=r, world_size=world, **kw)
        out.append([b for b in s])
    return out, s


def n_clusters(cl, batch):
    return len(np.unique(cl[batch]))


# ---- exactly once, cluster limits ---------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("bs, cpb", [(16, 1), (16, 2), (10, 3), (5, 4), (7, 7), (1, 1)])
def test_every_query_exactly_once_across_ranks(world, bs, cpb):
    cl = clusters(500, 23)
    batches, s = run_all_ranks(world, cluster_ids=cl, batch_size=bs, clusters_per_batch=cpb, seed=4)
    st_ = s.stats()
    # only a tiny-epoch tail that cannot be split over the ranks may be dropped (bs=1), and it is counted
    assert st_["dropped_rows"] == (500 % world if bs == 1 else 0)
    assert_exactly_once(batches, 500, dropped=st_["dropped_rows"])
    assert st_["rows"] == 500 - st_["dropped_rows"]
    assert all(b.dtype == np.int64 and 1 <= len(b) <= bs for r in batches for b in r)


@pytest.mark.parametrize("world", [1, 2])
def test_pairs_yield_one_row_per_query_exactly_once(world):
    cl = clusters(300, 11, seed=1)
    pt = pair_table(300, seed=2)
    batches, s = run_all_ranks(world, cluster_ids=cl, batch_size=8, pairs=pt, seed=9)
    nopairs = int((pt.counts() == 0).sum())
    assert nopairs > 0  # the fixture has queries without pairs: they are dropped and counted
    queries = [[pt.query_of(b) for b in r] for r in batches]
    assert_exactly_once(queries, 300, dropped=nopairs)
    rows = np.concatenate([np.concatenate(r) for r in batches])
    q = pt.query_of(rows)
    assert np.all((rows >= pt.offsets[q]) & (rows < pt.offsets[q + 1]))
    assert s.stats()["dropped"] == {"no_pairs": nopairs}
    st_ = s.stats()
    assert sum(st_["margin_bin_histogram"]) == 300 - nopairs
    assert json.loads(json.dumps(st_)) == st_  # with pairs too: lists, not arrays


def test_no_topup_layout_gives_pure_batches_only():
    # every cluster holds a multiple of batch_size queries: no remainder, so no top-up batch
    cl = np.repeat(np.arange(12), 32)[np.random.default_rng(0).permutation(384)]
    for world in (1, 2, 4):
        batches, s = run_all_ranks(world, cluster_ids=cl, batch_size=16, seed=1)
        assert all(n_clusters(cl, b) == 1 for r in batches for b in r)
        st_ = s.stats()
        assert st_["topup_batches"] == 0 and st_["topic_purity_min"] == 1.0


@pytest.mark.parametrize("bs, cpb", [(16, 1), (16, 4), (9, 2), (6, 4)])
def test_only_topup_batches_exceed_clusters_per_batch(bs, cpb):
    cl = clusters(700, 17, seed=3)
    s = TopicAwareBatchSampler(cl, batch_size=bs, clusters_per_batch=cpb, seed=0)
    got = [b for b in s]
    over = sum(n_clusters(cl, b) > cpb for b in got)
    st_ = s.stats()
    assert over == st_["batches_over_cluster_limit"] <= st_["topup_batches"]
    # top-ups are few: at most the remainder rows of each cluster (plus leftovers) fill them
    assert st_["topup_batches"] <= 17 * 2 + 2
    purity = np.array([np.bincount(cl[b]).max() / len(b) for b in got])
    np.testing.assert_allclose(np.sort(purity), np.sort(st_["topic_purity"]))


def test_drop_last_keeps_full_batches_and_counts_the_rest():
    cl = clusters(503, 7, seed=5)
    batches, s = run_all_ranks(3, cluster_ids=cl, batch_size=10, drop_last=True)
    assert all(len(b) == 10 for r in batches for b in r)
    st_ = s.stats()
    assert_exactly_once(batches, 503, dropped=st_["dropped_rows"])
    assert st_["dropped_rows"] == sum(st_["dropped"].values()) > 0


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), c=st.integers(1, 40), bs=st.integers(1, 40), cpb=st.integers(1, 5),
       world=st.integers(1, 4), seed=st.integers(0, 2**31), epoch=st.integers(0, 3))
def test_property_exactly_once_equal_counts(n, c, bs, cpb, world, seed, epoch):
    cpb = min(cpb, bs)
    world = min(world, n)
    cl = clusters(n, c, seed=seed % 1000)
    out = []
    for r in range(world):
        s = TopicAwareBatchSampler(cl, batch_size=bs, clusters_per_batch=cpb, seed=seed, rank=r, world_size=world)
        s.set_epoch(epoch)
        out.append(list(s))
        assert len(out[-1]) == len(s)
    dropped = s.stats()["dropped_rows"]
    assert set(s.stats()["dropped"]) <= {"uneven_tail_too_few_rows_to_split"}  # only a tiny epoch's tail
    assert_exactly_once(out, n, dropped=dropped)
    again = TopicAwareBatchSampler(cl, batch_size=bs, clusters_per_batch=cpb, seed=seed, rank=0, world_size=world)
    again.set_epoch(epoch)
    assert all(np.array_equal(a, b) for a, b in zip(again, out[0]))


def test_order_changes_with_epoch_and_seed():
    cl = clusters(400, 9)
    pt = pair_table(400, seed=3, min_pairs=3)
    s = TopicAwareBatchSampler(cl, batch_size=8, pairs=pt, seed=1)
    e0 = np.concatenate(list(s))
    s.set_epoch(1)
    e1 = np.concatenate(list(s))
    other = np.concatenate(list(TopicAwareBatchSampler(cl, batch_size=8, pairs=pt, seed=2)))
    assert not np.array_equal(e0, e1) and not np.array_equal(e0, other)
    # pair draws also change across epochs (not only the order)
    assert not np.array_equal(np.sort(e0), np.sort(e1))


# ---- balanced margin sampling -------------------------------------------------------------------------------
def skewed_table(nq, seed=0):
    """Every query has the same skewed margin layout: 10 bins holding [400, 200, 100, 50, 0, 20, 10, 10, 5, 5]."""
    per_bin = np.array([400, 200, 100, 50, 0, 20, 10, 10, 5, 5])
    base = np.concatenate([np.full(c, k + 0.5) for k, c in enumerate(per_bin)])
    base = np.concatenate([[0.0], base[1:-1], [10.0]])  # pin min/max so bins are [k, k+1)
    p = len(base)
    rng = np.random.default_rng(seed)
    margin = np.concatenate([rng.permutation(base) for _ in range(nq)])
    off = np.arange(nq + 1, dtype=np.int64) * p
    return PairTable(off, np.arange(nq * p), np.arange(nq * p), margin), per_bin


def drawn_bins(s, pt):
    rows = np.concatenate(list(s))
    m = pt.margin[rows]
    return np.minimum(np.floor(m / 10 * 10).astype(int), 9)


def test_balanced_draws_are_uniform_over_non_empty_bins():
    pt, per_bin = skewed_table(3000)
    s = TopicAwareBatchSampler(np.zeros(3000, np.int64), batch_size=50, pairs=pt, seed=11)
    hist = np.bincount(drawn_bins(s, pt), minlength=10)
    assert hist[4] == 0  # the empty bin is never drawn
    nonempty = hist[per_bin > 0]
    assert chisquare(nonempty).pvalue > 1e-3, hist
    np.testing.assert_array_equal(s.stats()["margin_bin_histogram"], hist)
    # the same check must reject the random strategy, which follows the skewed bin sizes
    r = TopicAwareBatchSampler(np.zeros(3000, np.int64), batch_size=50, pairs=pt, seed=11, strategy="random")
    rh = np.bincount(drawn_bins(r, pt), minlength=10)[per_bin > 0]
    assert chisquare(rh).pvalue < 1e-6
    expected = per_bin[per_bin > 0] / per_bin.sum() * rh.sum()
    assert chisquare(rh, expected).pvalue > 1e-3


def test_balanced_draws_are_uniform_inside_a_bin():
    pt, _ = skewed_table(4000, seed=1)
    s = TopicAwareBatchSampler(np.zeros(4000, np.int64), batch_size=100, pairs=pt, seed=3)
    rows = np.concatenate(list(s))
    in_bin1 = rows[(pt.margin[rows] >= 1) & (pt.margin[rows] < 2)]  # bin 1 holds 200 pairs per query
    # position of the drawn pair among its query's bin-1 pairs
    q = pt.query_of(in_bin1)
    pos = np.array([np.flatnonzero((pt.margin[pt.offsets[a]:pt.offsets[a + 1]] >= 1)
                                   & (pt.margin[pt.offsets[a]:pt.offsets[a + 1]] < 2)).tolist().index(r - pt.offsets[a])
                    for a, r in zip(q, in_bin1)])
    hist = np.bincount(pos // 20, minlength=10)  # 10 groups of 20 pairs
    assert chisquare(hist).pvalue > 1e-3, hist


def test_equal_margins_and_single_pairs():
    off = np.array([0, 5, 6, 9, 9])
    margin = np.array([2.0, 2.0, 2.0, 2.0, 2.0, 7.0, -1.0, -1.0, -1.0])
    pt = PairTable(off, np.arange(9), np.arange(9), margin)
    s = TopicAwareBatchSampler([0, 0, 1, 1], batch_size=2, pairs=pt)
    seen = {0: set()}
    for e in range(200):
        s.set_epoch(e)
        rows = np.concatenate(list(s))
        assert sorted(pt.query_of(rows).tolist()) == [0, 1, 2]
        seen[0].update(rows[pt.query_of(rows) == 0].tolist())
    assert seen[0] == {0, 1, 2, 3, 4}  # all equal margins: every pair is reachable
    st_ = s.stats()
    assert st_["equal_margin_queries"] == 2 and st_["queries_without_pairs"] == 1


# ---- resume -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_pairs", [False, True])
@pytest.mark.parametrize("rank, world", [(0, 1), (1, 2)])
def test_resumes_exactly(with_pairs, rank, world):
    cl = clusters(120, 6, seed=7)
    pt = pair_table(120, seed=8) if with_pairs else None

    def make():
        return TopicAwareBatchSampler(cl, batch_size=7, clusters_per_batch=2, pairs=pt, seed=5, rank=rank,
                                      world_size=world)

    assert_sampler_resumes_exactly(make, epochs=2)


def test_state_rejects_other_options():
    cl = clusters(50, 3)
    s = TopicAwareBatchSampler(cl, batch_size=5)
    state = s.state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        TopicAwareBatchSampler(cl, batch_size=6).load_state_dict(state)
    with pytest.raises(ValueError, match="strategy"):
        TopicAwareBatchSampler(cl, batch_size=5, pairs=pair_table(50), strategy="random").load_state_dict(
            TopicAwareBatchSampler(cl, batch_size=5, pairs=pair_table(50)).state_dict())


# ---- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cl, kw, exc, match",
    [
        ([0.5, 1.0], {"batch_size": 2}, TypeError, r"cluster_ids must be an integer array"),
        ([np.nan, 1.0], {"batch_size": 2}, TypeError, r"cluster_ids must be an integer array"),
        ([], {"batch_size": 2}, ValueError, r"cluster_ids is empty"),
        ([[0, 1]], {"batch_size": 2}, ValueError, r"cluster_ids must be 1-D"),
        ([0, -1, 2], {"batch_size": 2}, ValueError, r"cluster_ids must be >= 0 \(query 1 has cluster -1\)"),
        ([0, 1], {"batch_size": 0}, ValueError, r"batch_size must be an integer >= 1"),
        ([0, 1], {"batch_size": 2, "clusters_per_batch": 3}, ValueError, r"clusters_per_batch must be <= batch_size"),
        ([0, 1], {"batch_size": 2, "strategy": "hard"}, ValueError, r"strategy must be one of"),
        ([0, 1], {"batch_size": 2, "margin_bins": 0}, ValueError, r"margin_bins must be an integer >= 1"),
        ([0, 1], {"batch_size": 2, "pairs": {"offsets": [0]}}, TypeError, r"pairs must be a samplers.PairTable"),
        ([0, 1], {"batch_size": 2, "world_size": 3, "rank": 0}, ValueError, r"world_size=3 is larger"),
    ],
)
def test_sampler_bad_input(cl, kw, exc, match):
    with pytest.raises(exc, match=match):
        TopicAwareBatchSampler(cl, **kw)


def test_pairs_naming_unknown_queries():
    with pytest.raises(ValueError, match=r"pair row 2 names query 5, which is not in \[0, 4\)"):
        PairTable.from_arrays([0, 1, 5, 2], [1, 2, 3, 4], [5, 6, 7, 8], [0.1, 0.2, 0.3, 0.4], num_queries=4)
    with pytest.raises(ValueError, match=r"pair row 0 names query -1"):
        PairTable.from_arrays([-1], [1], [2], [0.1], num_queries=4)
    pt = PairTable.from_arrays([0, 1], [1, 2], [3, 4], [0.1, 0.2], num_queries=2)
    with pytest.raises(ValueError, match=r"pairs covers 2 queries but cluster_ids has 3"):
        TopicAwareBatchSampler([0, 0, 1], batch_size=2, pairs=pt)
    empty = PairTable(np.zeros(3, np.int64), [], [], [])
    with pytest.raises(ValueError, match="no query has a pair"):
        TopicAwareBatchSampler([0, 1], batch_size=2, pairs=empty)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        (([1, 2], [0], [0], [0.0]), ValueError, r"offsets must be non-empty and start at 0"),
        (([0, 2, 1], [0, 1], [0, 1], [0.0, 1.0]), ValueError, r"offsets must be non-decreasing"),
        (([0, 2], [0], [0, 1], [0.0, 1.0]), ValueError, r"pos_id has 1 rows but offsets\[-1\]=2"),
        (([0, 2], [0, 1], [0, 1], [0.0, np.nan]), ValueError, r"margin has NaN/inf at pair row 1"),
        (([0, 1], [0.5], [0], [0.0]), TypeError, r"pos_id must be an integer array"),
    ],
)
def test_pair_table_validation(args, exc, match):
    with pytest.raises(exc, match=match):
        PairTable(*[np.asarray(a) for a in args])


def test_from_arrays_groups_rows_by_query():
    pt = PairTable.from_arrays([2, 0, 2, 0], [10, 11, 12, 13], [0, 0, 0, 0], [1.0, 2.0, 3.0, 4.0], num_queries=3)
    assert pt.offsets.tolist() == [0, 2, 2, 4]
    assert pt.pos_id.tolist() == [11, 13, 10, 12]
    assert pt.query_of([0, 1, 2, 3]).tolist() == [0, 0, 2, 2]
    with pytest.raises(IndexError):
        pt.query_of([4])


def test_kmeans_bad_input_reaches_the_user_before_sampling():
    with pytest.raises(ValueError, match=r"k must be <= the number of points n=3"):
        native.kmeans(np.zeros((3, 4), np.float32), 5)
    x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    x[7, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN/inf values in row 7"):
        native.kmeans(x, 3)


# ---- integration: FAISS clusters -> topic-aware batches -----------------------------------------------------
def test_faiss_clusters_make_batches_topical():
    rng = np.random.default_rng(0)
    topics = rng.normal(size=(20, 16)) * 2
    labels = rng.integers(0, 20, 2000)
    emb = (topics[labels] + rng.normal(size=(2000, 16))).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    _, cl = native.kmeans(emb, 20, seed=0, gpu="auto")
    tas = TopicAwareBatchSampler(cl, batch_size=32, seed=0)
    rnd = TopicAwareBatchSampler(np.zeros(2000, np.int64), batch_size=32, seed=0)  # one cluster = random batches

    def mean_sim(s):
        return np.mean([(emb[b] @ emb[b].T)[np.triu_indices(len(b), 1)].mean() for b in s if len(b) > 1])

    assert mean_sim(tas) > mean_sim(rnd) + 0.2
    assert tas.stats()["topic_purity_mean"] > 0.8


def _gloo_worker(rank, world, path, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        cl = clusters(200, 9, seed=2)
        s = TopicAwareBatchSampler(cl, batch_size=6, clusters_per_batch=2, seed=3)  # rank/world from torch
        assert (s.rank, s.world_size) == (rank, world)
        np.save(os.path.join(out, f"rank{rank}.npy"), np.concatenate(list(s)))
        np.save(os.path.join(out, f"len{rank}.npy"), np.array([len(s)]))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_real_gloo_group_covers_every_query_once(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_gloo_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    rows = np.concatenate([np.load(tmp_path / f"rank{r}.npy") for r in range(2)])
    assert sorted(rows.tolist()) == list(range(200))
    assert np.load(tmp_path / "len0.npy")[0] == np.load(tmp_path / "len1.npy")[0]


def test_from_arrays_length_mismatch():
    with pytest.raises(ValueError, match=r"neg_id has shape \(1,\) but query has 2 rows"):
        PairTable.from_arrays([0, 1], [1, 2], [3], [0.1, 0.2], num_queries=2)
