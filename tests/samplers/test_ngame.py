"""NGAMEBatchSampler (Dahiya et al., WSDM 2023): coverage, balance, refresh timing, resume, real gloo ranks, mask."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from samplers.labels import positive_mask
from samplers.ngame import NGAMEBatchSampler
from tests.helpers import assert_exactly_once, assert_sampler_resumes_exactly, free_port


def emb_of(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def epoch_batches(s: NGAMEBatchSampler, epoch: int) -> list[np.ndarray]:
    s.set_epoch(epoch)
    return [b.copy() for b in s]


# ---- coverage and balance -------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 300), world=st.integers(1, 4), per=st.integers(1, 4), cs=st.integers(1, 6),
       clustered=st.booleans(), seed=st.integers(0, 1000), epoch=st.integers(0, 3))
def test_every_row_once_per_epoch_across_ranks(n, world, per, cs, clustered, seed, epoch):
    if world > n:
        return
    emb = emb_of(n, 4, seed) if clustered else None
    samplers = [NGAMEBatchSampler(n, batch_size=per * cs, cluster_size=cs, warmup_epochs=0, refresh_every=1,
                                  embeddings=emb, seed=seed, rank=r, world_size=world) for r in range(world)]
    batches = [epoch_batches(s, epoch) for s in samplers]
    dropped = samplers[0].stats()["dropped_rows"]  # only when rows cannot fill a batch per rank (counted)
    assert dropped <= world - 1
    assert_exactly_once(batches, n, dropped)
    assert all(len(b) == len(s) for b, s in zip(batches, samplers))
    assert all(b.dtype == np.int64 and len(b) <= per * cs for bs in batches for b in bs)
    assert samplers[0].stats()["clustered"] is clustered


@pytest.mark.parametrize("n, cs", [(1000, 8), (1001, 8), (777, 5), (64, 64), (10, 16)])
def test_clusters_balanced_and_batches_are_whole_clusters(n, cs):
    s = NGAMEBatchSampler(n, batch_size=4 * cs, cluster_size=cs, embeddings=emb_of(n), seed=3)
    st_ = s.stats()
    assert st_["clustered"] and st_["num_clusters"] == -(-n // cs)
    assert st_["max_cluster_size"] - st_["min_cluster_size"] <= 1 and st_["max_cluster_size"] <= cs
    ids = s.cluster_ids
    assert ids is not None and len(ids) == n
    for b in s:
        # each batch holds whole clusters, at most batch_size // cluster_size of them
        clusters = np.unique(ids[b])
        assert len(clusters) <= 4
        assert sum(int((ids == c).sum()) for c in clusters) == len(b)


@pytest.mark.parametrize("cs, factor", [(8, 3), (40, 10)])
def test_clustered_batches_hold_close_points(cs, factor):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, 32))
    lab = rng.integers(0, 50, 2000)
    emb = centres[lab] + 0.1 * rng.normal(size=(2000, 32))
    s = NGAMEBatchSampler(2000, batch_size=40, cluster_size=cs, embeddings=emb)
    same = np.mean([np.mean(lab[b][:, None] == lab[b][None, :]) for b in s])
    r = NGAMEBatchSampler(2000, batch_size=40, cluster_size=cs)  # no embeddings: random batches
    same_random = np.mean([np.mean(lab[b][:, None] == lab[b][None, :]) for b in r])
    # a batch is batch_size // cluster_size shuffled clusters (as in NGAME), so smaller clusters mix more
    assert same > factor * same_random


# ---- refresh timing -------------------------------------------------------------------------------------------
def test_refresh_only_when_due_and_after_update_embeddings():
    n = 200
    emb = emb_of(n)
    s = NGAMEBatchSampler(n, batch_size=16, cluster_size=4, refresh_every=2, warmup_epochs=1, seed=1)
    digests = []
    for e in range(7):
        s.set_epoch(e)
        digests.append(s.state_dict()["clusters_digest"])
        batches = list(s)
        if e in (0, 1, 2):  # the bank is written during epochs 0-2 and 4, not 3 or 5
            for b in batches:
                s.update_embeddings(b, emb[b] + e)
        elif e == 4:
            for b in batches:
                s.update_embeddings(b, -emb[b])
    # epoch 0: warm-up (random); 1: due and the bank is full -> clustered; 2: not due; 3: due, bank changed in
    # epochs 1-2 -> re-clustered; 4: not due; 5: due, bank changed in epoch 4; 6: not due
    assert digests[0] == ""
    assert digests[1] != "" and digests[2] == digests[1]
    assert digests[3] != digests[2] and digests[4] == digests[3]
    assert digests[5] != digests[4] and digests[6] == digests[5]
    assert s.stats()["refreshes"] == 3


def test_due_refresh_without_new_embeddings_keeps_the_clusters():
    n = 100
    s = NGAMEBatchSampler(n, batch_size=8, cluster_size=4, refresh_every=1, embeddings=emb_of(n))
    d0 = s.state_dict()["clusters_digest"]
    for e in range(1, 4):
        s.set_epoch(e)
        assert s.state_dict()["clusters_digest"] == d0
    s.update_embeddings(np.arange(n), emb_of(n, seed=9))
    s.set_epoch(4)
    assert s.state_dict()["clusters_digest"] != d0


def test_incomplete_bank_skips_due_refresh_and_refresh_raises():
    s = NGAMEBatchSampler(50, batch_size=8, cluster_size=4, refresh_every=1, warmup_epochs=1)
    s.update_embeddings(np.arange(49), emb_of(49))
    s.set_epoch(1)
    assert not s.stats()["clustered"] and s.stats()["refreshes_skipped_incomplete_bank"] == 1
    with pytest.raises(ValueError, match="1 of 50 rows have none"):
        s.refresh()
    s.update_embeddings([49], emb_of(1))
    s.refresh()
    assert s.stats()["clustered"]


def test_cluster_size_schedule_reclusters_at_its_epochs():
    n = 256
    s = NGAMEBatchSampler(n, batch_size=16, cluster_size_schedule={0: 2, 2: 4, 3: 8}, refresh_every=100,
                          embeddings=emb_of(n))
    sizes = []
    for e in range(5):
        s.set_epoch(e)
        sizes.append(s.stats()["cluster_size"])
    assert sizes == [2, 2, 4, 8, 8]
    assert s.stats()["num_clusters"] == 32


def test_refresh_mid_epoch_is_refused():
    s = NGAMEBatchSampler(100, batch_size=8, cluster_size=4, embeddings=emb_of(100))
    it = iter(s)
    next(it)
    with pytest.raises(ValueError, match="between epochs"):
        s.refresh()


# ---- resume ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world, rank", [(1, 0), (2, 1)])
def test_resumes_exactly_across_refreshes_with_constructor_embeddings(world, rank):
    n = 150
    emb = emb_of(n)

    def make():
        return NGAMEBatchSampler(n, batch_size=12, cluster_size=4, refresh_every=1, warmup_epochs=1,
                                 embeddings=emb, seed=7, rank=rank, world_size=world)

    assert_sampler_resumes_exactly(make, epochs=2)


def train(s: NGAMEBatchSampler, emb: np.ndarray, epochs: range, stop_at: tuple[int, int] | None = None):
    """A toy training loop writing the bank from each batch (the 'encoder' drifts with the epoch); stops after
    ``stop_at = (epoch, batches)``."""
    out = []
    for e in epochs:
        s.set_epoch(e)
        done = s.state_dict()["batches_yielded"]
        if stop_at == (e, done):
            return out
        for b in s:
            out.append(b.copy())
            s.update_embeddings(b, emb[b] * (1 + e) + np.sin(e * emb[b][:, ::-1]))
            done += 1
            if stop_at == (e, done):
                return out
    return out


@pytest.mark.parametrize("stop_at", [(0, 3), (1, 0), (1, 5), (2, 9), (3, 17)])
def test_resumes_exactly_with_saved_clusters_and_bank(tmp_path, stop_at):
    n, emb = 170, emb_of(170, 6)

    def make():
        return NGAMEBatchSampler(n, batch_size=10, cluster_size=5, refresh_every=2, warmup_epochs=1, seed=4)

    ref = train(make(), emb, range(6))
    a = make()
    head = train(a, emb, range(stop_at[0] + 1), stop_at=stop_at)
    state = a.state_dict()
    a.save_clusters(tmp_path / "ngame.npz")
    if state["clustered_epoch"] >= 0:
        with pytest.raises(ValueError, match="load_clusters"):
            make().load_state_dict(state)
    b = make()
    b.load_clusters(tmp_path / "ngame.npz")
    b.load_state_dict(state)
    tail = train(b, emb, range(stop_at[0], 6))
    got = head + tail
    assert len(got) == len(ref)
    assert all(np.array_equal(x, y) for x, y in zip(got, ref))


def test_load_state_dict_rejects_other_config():
    s = NGAMEBatchSampler(100, batch_size=8, cluster_size=4)
    state = s.state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        NGAMEBatchSampler(100, batch_size=16, cluster_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="missing keys"):
        s.load_state_dict({k: v for k, v in state.items() if k != "clusters_digest"})


# ---- a real 2-process gloo group ------------------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        n = 203
        truth = emb_of(n, 8, seed=11)
        # scenario A: each rank writes only the rows of its own batches; rank 0 merges, clusters, broadcasts
        s = NGAMEBatchSampler(n, batch_size=12, cluster_size=4, warmup_epochs=1, refresh_every=1, seed=3)
        e0 = epoch_batches(s, 0)
        for b in e0:
            s.update_embeddings(b, truth[b])
        e1 = epoch_batches(s, 1)
        # scenario B: the ranks were given different initial embeddings: rank 0's win
        t = NGAMEBatchSampler(n, batch_size=12, cluster_size=4, embeddings=emb_of(n, 8, seed=100 + rank), seed=3)
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), e0=np.concatenate(e0), e1=np.concatenate(e1),
                 n0=len(e0), n1=len(e1), ids_a=s.cluster_ids, ids_b=t.cluster_ids, b_batches=np.concatenate(list(t)),
                 sizes1=np.array([len(b) for b in e1]))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_share_rank0_plan(tmp_path):
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r = [np.load(tmp_path / f"rank{k}.npz") for k in range(2)]
    n, s0 = 203, 3
    for key in ("e0", "e1"):
        allrows = np.concatenate([r[0][key], r[1][key]])
        assert sorted(allrows.tolist()) == list(range(n)), key
    assert int(r[0]["n1"]) == int(r[1]["n1"])
    # both ranks hold the clustering rank 0 computed from the merged bank: the clustering one process gets when
    # its bank holds every row's true embedding
    one = NGAMEBatchSampler(n, batch_size=12, cluster_size=4, warmup_epochs=1, refresh_every=1, seed=s0)
    one.update_embeddings(np.arange(n), emb_of(n, 8, seed=11))
    one.set_epoch(1)
    expect = one.cluster_ids
    assert expect is not None
    np.testing.assert_array_equal(r[0]["ids_a"], expect)
    np.testing.assert_array_equal(r[1]["ids_a"], expect)
    # scenario B: rank 0's initial embeddings win, as in one process given them
    expect_b = NGAMEBatchSampler(n, batch_size=12, cluster_size=4, embeddings=emb_of(n, 8, seed=100),
                                 seed=s0).cluster_ids
    np.testing.assert_array_equal(r[0]["ids_b"], expect_b)
    np.testing.assert_array_equal(r[1]["ids_b"], expect_b)
    assert sorted(np.concatenate([r[0]["b_batches"], r[1]["b_batches"]]).tolist()) == list(range(n))


# ---- positive mask --------------------------------------------------------------------------------------------
def dense_labels(indptr, indices, n_labels):
    Y = np.zeros((len(indptr) - 1, n_labels), bool)
    for i in range(len(indptr) - 1):
        Y[i, indices[indptr[i]:indptr[i + 1]]] = True
    return Y


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), L=st.integers(1, 30), B=st.integers(0, 25), seed=st.integers(0, 10**6))
def test_positive_mask_matches_dense_reference(n, L, B, seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, min(4, L) + 1, n)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    indices = np.concatenate([rng.choice(L, c, replace=False) for c in counts]) if counts.sum() else np.zeros(0, int)
    Y = dense_labels(indptr, indices, L)
    rows = rng.integers(0, n, B)
    m = positive_mask(rows, indptr, indices)
    assert m.dtype == torch.bool and tuple(m.shape) == (B, B)
    np.testing.assert_array_equal(m.numpy(), (Y[rows].astype(int) @ Y[rows].T.astype(int)) > 0)
    bl = rng.integers(0, L, B)
    m2 = positive_mask(rows, indptr, indices, batch_labels=bl)
    np.testing.assert_array_equal(m2.numpy(), Y[rows][:, bl])


@pytest.mark.parametrize("args, match", [
    ((np.array([0, 5]), np.array([0, 1, 2]), np.array([0, 1])), r"batch_rows must be in \[0, 2\)"),
    ((np.array([0]), np.array([1, 2]), np.array([0, 1])), "CSR pointer"),
    ((np.array([0]), np.array([0, 3]), np.array([0, 1])), "CSR pointer"),
    ((np.array([[0]]), np.array([0, 1]), np.array([0])), "1-D integer"),
])
def test_positive_mask_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        positive_mask(*args)


# ---- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 10, "cluster_size": 4}, "multiple of cluster_size"),
    ({"batch_size": 8, "cluster_size_schedule": {0: 2, 5: 3}}, "cluster_size=3 from epoch 5"),
    ({"batch_size": 8, "cluster_size": 0}, "cluster_size must be"),
    ({"batch_size": 0}, "batch_size must be"),
    ({"batch_size": 8, "refresh_every": 0}, "refresh_every must be"),
    ({"batch_size": 8, "embeddings": np.zeros((9, 4))}, r"\[10, d\]"),
    ({"batch_size": 8, "embeddings": np.zeros(10)}, r"\[10, d\]"),
    ({"batch_size": 8, "embeddings": np.where(np.eye(10, 3) > 0, np.nan, 0.0)}, "NaN or inf.*row 0"),
])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NGAMEBatchSampler(10, **kwargs)


def test_bad_update_embeddings():
    s = NGAMEBatchSampler(10, batch_size=4, cluster_size=2)
    with pytest.raises(ValueError, match=r"in \[0, num_rows=10\)"):
        s.update_embeddings([3, 10], np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\[2, d\]"):
        s.update_embeddings([1, 2], np.zeros((3, 4)))
    bad = np.zeros((2, 4))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or inf.*row 1"):
        s.update_embeddings([1, 2], bad)
    s.update_embeddings(torch.tensor([1, 2]), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="dimension 5 but the bank holds dimension 4"):
        s.update_embeddings([1], np.zeros((1, 5)))
    assert s.stats()["bank_rows_filled"] == 2 and s.stats()["bank_bytes"] == 10 * 4 * 2


def test_num_items_is_the_deprecated_name_of_num_rows():
    emb = np.random.default_rng(0).normal(size=(40, 4))
    new = NGAMEBatchSampler(num_rows=40, batch_size=8, cluster_size=4, embeddings=emb, seed=3)
    with pytest.warns(DeprecationWarning, match="num_items=.* is deprecated: pass num_rows="):
        old = NGAMEBatchSampler(num_items=40, batch_size=8, cluster_size=4, embeddings=emb, seed=3)
    assert [b.tolist() for b in old] == [b.tolist() for b in new] == \
        [b.tolist() for b in NGAMEBatchSampler(40, batch_size=8, cluster_size=4, embeddings=emb, seed=3)]
    new.load_state_dict(old.state_dict())  # the same configuration: a checkpoint of either name loads in the other
    assert new.num_rows == 40
    with pytest.warns(DeprecationWarning, match="num_items is deprecated: read num_rows"):
        assert old.num_items == 40
    with pytest.raises(TypeError, match="pass the row count once, as num_rows"):
        NGAMEBatchSampler(40, batch_size=8, num_items=40)
    with pytest.raises(TypeError, match="needs the row count: pass num_rows"):
        NGAMEBatchSampler(batch_size=8)


def test_default_cluster_size_divides_batch_size():
    assert NGAMEBatchSampler(100, batch_size=100).cluster_size_at(0) == 10
    assert NGAMEBatchSampler(100, batch_size=64).cluster_size_at(0) == 16
