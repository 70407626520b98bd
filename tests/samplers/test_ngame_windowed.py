"""NGAMEBatchSampler above EXACT_MAX_ROWS (the windowed path, threshold and window size patched low): coverage,
whole clusters, lazy plan == materialised plan, refresh through datapipe.DataLoader, exact resume (also in a fresh
process), two real gloo ranks sharing one bank file; and the kernels of native.ngame_windows against numpy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.utils.data as tud

import datapipe
import samplers.ngame as ng
import samplers.ngame_windowed as ngw
from native.feistel import feistel_permute
from native.ngame_windows import (
    cluster_batch_sizes,
    cluster_span,
    clusters_rows,
    scatter_cells,
)
from samplers.ngame import NGAMEBatchSampler
from samplers.ngame_windowed import Layout
from tests.helpers import (
    assert_exactly_once,
    assert_sampler_resumes_exactly,
    free_port,
    lazy_plan_ranks,
)
from tests.samplers.test_ngame import train  # the toy training loop that writes the bank from each batch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N = 100_000
THRESHOLD, WINDOW, SCAN = 1000, 1 << 15, 1 << 14


@pytest.fixture(autouse=True)
def windowed(monkeypatch):
    monkeypatch.setattr(ng, "EXACT_MAX_ROWS", THRESHOLD)
    monkeypatch.setattr(ng, "WINDOW_ROWS", WINDOW)


def blobs(n: int, d: int = 8, k: int = 500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of ``k`` Gaussian blobs and each row's blob."""
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, k, n)
    return (rng.normal(size=(k, d))[lab] + 0.05 * rng.normal(size=(n, d))).astype(np.float32), lab


EMB, LAB = blobs(N)


def make(tmp, rank=0, world=1, **kw):
    args = {"batch_size": 64, "cluster_size": 16, "seed": 5, "rank": rank, "world_size": world,
            "bank_path": tmp / f"bank{rank}.npy"}
    return NGAMEBatchSampler(N, **{**args, **kw})


# ---- the kernels against numpy --------------------------------------------------------------------------------
@pytest.mark.parametrize("n, window, cs, per", [(1000, 300, 16, 4), (777, 777, 5, 3), (50, 7, 3, 1)])
def test_kernels_match_numpy_reference(n, window, cs, per):
    lay = Layout.of(n, window, cs)
    rows_file = np.random.default_rng(0).permutation(n).astype(np.int32)
    K = lay.num_clusters
    order = feistel_permute(np.arange(K), K, 99)
    spans = [cluster_span(int(c), lay.wstart, lay.kcum) for c in range(K)]
    assert sum(sz for _, sz in spans) == n and [s for s, _ in spans] == sorted(s for s, _ in spans)
    assert max(sz for _, sz in spans) <= cs
    nb = -(-K // per)
    want = [sum(spans[c][1] for c in order[b * per:(b + 1) * per]) for b in range(nb)]
    assert cluster_batch_sizes(nb, per, 99, lay.wstart, lay.kcum).tolist() == want
    got = clusters_rows(rows_file, per, min(2 * per, K - per), 99, lay.wstart, lay.kcum)
    picked = order[per:per + min(2 * per, K - per)]
    ref = np.concatenate([rows_file[spans[c][0]:spans[c][0] + spans[c][1]] for c in picked])
    assert got.tolist() == ref.tolist()


def test_scatter_cells_is_a_stable_counting_sort():
    rng = np.random.default_rng(1)
    cells = rng.integers(0, 7, 1000)
    counts = np.bincount(cells, minlength=7)
    out = np.full(1000, -1, dtype=np.int32)
    cursor = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    for a in range(0, 1000, 300):  # in chunks, as the assignment pass writes them
        scatter_cells(cells[a:a + 300], a, cursor, out)
    assert out.tolist() == np.argsort(cells, kind="stable").tolist()
    assert cursor.tolist() == np.cumsum(counts).tolist()
    with pytest.raises(ValueError, match=r"cells must lie in \[0, 7\)"):
        scatter_cells(np.array([7]), 0, cursor, out)


# ---- coverage, whole clusters, the lazy plan ------------------------------------------------------------------
def test_every_row_once_whole_clusters_and_batch_sizes(tmp_path):
    world = 2
    ss = [make(tmp_path, r, world, embeddings=EMB) for r in range(world)]
    st = ss[0].stats()
    sizes = np.diff(ss[0]._wc.layout.wstart)  # windows: the coarse cells (4 here), cut at WINDOW rows
    assert st["clustered"] and st["plan"] == "windowed" and st["num_windows"] == len(sizes) >= 4
    assert sizes.max() <= WINDOW and sizes.sum() == N
    assert st["num_clusters"] == sum(-(-m // 16) for m in sizes)
    assert 1 <= st["min_cluster_size"] <= st["max_cluster_size"] <= 16
    json.dumps(st)
    batches = [list(s) for s in ss]
    assert_exactly_once(batches, N, st["dropped_rows"])
    ids = ss[0].cluster_ids
    sizes = np.bincount(ids)
    for b in batches[1]:
        assert len(b) <= 64
        clusters = np.unique(ids[b])
        assert len(clusters) <= 4 and sizes[clusters].sum() == len(b)  # whole clusters
    # the same clusters on every rank (each clustered its own copy of the same embeddings)
    assert all(np.array_equal(s.cluster_ids, ids) for s in ss[1:])
    # close points share batches: a batch is 4 shuffled clusters, so ~1/4 of pairs share a blob when every cluster
    # is one blob (random batches: 1/64 + 1/500)
    same = np.mean([np.mean(LAB[b][:, None] == LAB[b][None, :]) for b in batches[0][:200]])
    assert same > 0.15, same


@pytest.mark.parametrize("drop_last, world", [(False, 3), (True, 2)])
def test_lazy_plan_is_the_materialised_plan(tmp_path, drop_last, world):
    n, emb = 5003, EMB[:5003]

    def mk(r, w):
        return NGAMEBatchSampler(n, batch_size=48, cluster_size=16, seed=1, rank=r, world_size=w, drop_last=drop_last,
                                 embeddings=emb, bank_path=tmp_path / "b.npy", warmup_epochs=1)
    for epoch in (0, 1):  # a random epoch (warm-up) and a clustered one
        out = lazy_plan_ranks(mk, world, epoch)
        assert out[0][0].stats()["clustered"] == (epoch == 1)
        assert_exactly_once([bs for _, _, bs in out] and [[np.asarray(b, dtype=np.int64) for b in bs]
                                                          for _, _, bs in out], n, out[0][0].stats()["dropped_rows"])
        assert drop_last or out[0][0].stats()["dropped_rows"] == 0


def test_random_epoch_is_a_feistel_permutation_and_needs_no_bank():
    s = NGAMEBatchSampler(N, batch_size=1000, seed=2)
    rows = np.concatenate(list(s))
    assert sorted(rows.tolist()) == list(range(N)) and s.stats()["bank_bytes"] == 0
    s.set_epoch(1)
    assert not np.array_equal(np.concatenate(list(s)), rows)


def test_cluster_size_schedule_and_incomplete_bank(tmp_path):
    n = 4000
    s = NGAMEBatchSampler(n, batch_size=16, cluster_size_schedule={0: 4, 2: 8}, refresh_every=100, warmup_epochs=1,
                          bank_path=tmp_path / "b.npy")
    s.update_embeddings(np.arange(n - 1), EMB[: n - 1])
    s.set_epoch(1)  # due, but row n - 1 has no embedding: skipped and counted
    assert not s.stats()["clustered"] and s.stats()["refreshes_skipped_incomplete_bank"] == 1
    with pytest.raises(ValueError, match="1 of 4000 rows have none"):
        s.refresh()
    s.update_embeddings([n - 1], EMB[n - 1 : n])
    s.refresh()
    assert s.stats()["cluster_size"] == 4 and s.stats()["num_clusters"] == n // 4
    s.set_epoch(2)  # the schedule's new size re-clusters (not a refresh epoch)
    st = s.stats()
    assert st["cluster_size"] == 8 and st["num_clusters"] == n // 8 and st["clustered_epoch"] == 2
    assert sorted(np.concatenate(list(s)).tolist()) == list(range(n))


# ---- refresh through the loader -------------------------------------------------------------------------------
class Rows(tud.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor(i)


def test_refresh_through_the_loader(tmp_path):
    n, B = 20_000, 64
    emb, lab = blobs(n, k=400, seed=3)
    sampler = NGAMEBatchSampler(n, batch_size=B, cluster_size=16, warmup_epochs=1, refresh_every=1, seed=0,
                                bank_path=tmp_path / "bank.npy")
    loader = datapipe.DataLoader(Rows(n), batch_sampler=sampler)
    same = []
    for _ in range(2):
        seen = []
        for batch in loader:
            rows = batch.numpy()
            seen.append(rows)
            sampler.update_embeddings(rows, emb[rows])  # the model's embeddings of this batch
        assert sorted(np.concatenate(seen).tolist()) == list(range(n))
        same.append(np.mean([np.mean(lab[b][:, None] == lab[b][None, :]) for b in seen]))
    st = sampler.stats()
    assert st["refreshes"] >= 1 and st["clustered"] and st["bank_rows_filled"] == n
    assert same[0] < 0.05 and same[1] > 0.15, same  # random batches, then ~1/4 (4 clusters of one blob each)


# ---- resume ---------------------------------------------------------------------------------------------------
def test_resumes_exactly_with_constructor_embeddings(tmp_path):
    n = 3000

    def mk():
        return NGAMEBatchSampler(n, batch_size=64, cluster_size=16, refresh_every=1, warmup_epochs=1, seed=7,
                                 embeddings=EMB[:n], bank_path=tmp_path / "b.npy")
    assert_sampler_resumes_exactly(mk, epochs=2, steps=[0, 1, 20, 46, 47])


FRESH = """
import json, sys, numpy as np
sys.path.insert(0, {root!r})
import samplers.ngame as ng
ng.EXACT_MAX_ROWS, ng.WINDOW_ROWS = {thr}, {win}
from samplers.ngame import NGAMEBatchSampler
from tests.samplers.test_ngame_windowed import train, EMB
s = NGAMEBatchSampler({n}, batch_size=64, cluster_size=16, refresh_every=2, warmup_epochs=1, seed=4,
                      bank_path={bank!r})
if {clusters!r}:
    s.load_clusters({clusters!r})
s.load_state_dict(json.load(open({state!r})))
np.save({out!r}, np.concatenate(train(s, EMB[:{n}], range({e0}, 4))))
"""


@pytest.mark.parametrize("stop_at, via_file", [
    ((2, 0), True),
    pytest.param((1, 17), False, marks=pytest.mark.slow),  # a fresh process and two training runs: ~7 s each
    pytest.param((3, 5), False, marks=pytest.mark.slow),
])
def test_resumes_exactly_in_a_fresh_process(tmp_path, stop_at, via_file):
    n = 6000

    def mk(bank):
        return NGAMEBatchSampler(n, batch_size=64, cluster_size=16, refresh_every=2, warmup_epochs=1, seed=4,
                                 bank_path=bank)
    ref = np.concatenate(train(mk(tmp_path / "ref.npy"), EMB[:n], range(4)))
    a = mk(tmp_path / "run.npy")
    head = train(a, EMB[:n], range(stop_at[0] + 1), stop_at=stop_at)
    state = a.state_dict()
    assert state["clustered_epoch"] == 1 + 2 * (stop_at[0] >= 3) and state["clusters_digest"]
    (tmp_path / "state.json").write_text(json.dumps(state))
    clusters = ""
    if via_file:
        clusters = str(tmp_path / "ckpt.npz")
        a.save_clusters(clusters)
    del a
    code = FRESH.format(root=ROOT, thr=THRESHOLD, win=WINDOW, n=n, bank=str(tmp_path / "run.npy"), clusters=clusters,
                        state=str(tmp_path / "state.json"), out=str(tmp_path / "tail.npy"), e0=stop_at[0])
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
    got = np.concatenate([*head, np.load(tmp_path / "tail.npy")])
    np.testing.assert_array_equal(got, ref)


def test_state_without_its_clustering_file_or_of_other_windows_is_refused(tmp_path, monkeypatch):
    n = 3000
    a = NGAMEBatchSampler(n, batch_size=64, cluster_size=16, embeddings=EMB[:n], bank_path=tmp_path / "b.npy")
    state = a.state_dict()
    monkeypatch.setattr(ng, "WINDOW_ROWS", WINDOW // 2)
    with pytest.raises(ValueError, match="other options: window_rows=32768 there, window_rows=16384"):
        NGAMEBatchSampler(n, batch_size=64, cluster_size=16, bank_path=tmp_path / "b.npy").load_state_dict(state)
    monkeypatch.setattr(ng, "WINDOW_ROWS", WINDOW)
    os.unlink(a.stats()["clusters_path"])
    with pytest.raises(ValueError, match="rows-by-cluster file .* is missing"):
        NGAMEBatchSampler(n, batch_size=64, cluster_size=16, bank_path=tmp_path / "b.npy").load_state_dict(state)


# ---- bad input ------------------------------------------------------------------------------------------------
def test_bank_path_is_required_and_foreign_files_refused(tmp_path):
    s = NGAMEBatchSampler(N, batch_size=64, cluster_size=16)
    with pytest.raises(ValueError, match="needs the sampler built with bank_path="):
        s.update_embeddings(np.arange(3), EMB[:3])
    with pytest.raises(ValueError, match="need bank_path="):
        NGAMEBatchSampler(N, batch_size=64, cluster_size=16, embeddings=EMB)
    bad = EMB.copy()
    bad[777, 3] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(ValueError, match=r"NaN or inf values \(first at row 777 of .*bad.npy"):
        NGAMEBatchSampler(N, batch_size=64, embeddings=np.load(tmp_path / "bad.npy", mmap_mode="r"),
                          bank_path=tmp_path / "b.npy")
    np.save(tmp_path / "foreign.npy", EMB)
    with pytest.raises(ValueError, match="was not created by NGAMEBatchSampler"):
        NGAMEBatchSampler(N, batch_size=64, bank_path=tmp_path / "foreign.npy").update_embeddings([0], EMB[:1])


def test_memory_mapped_embeddings_used_in_place(tmp_path):
    path = tmp_path / "emb.npy"
    np.save(path, EMB)
    mm = np.load(path, mmap_mode="r")
    s = NGAMEBatchSampler(N, batch_size=64, cluster_size=16, seed=5, embeddings=mm, bank_path=path)
    st = s.stats()
    assert st["bank_rows_filled"] == N and st["clustered"] and st["bank_bytes"] == EMB.nbytes  # float32, not copied
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".npy") and "emb.npy" not in p]
    ids = s.cluster_ids
    pure = np.mean([len(np.unique(LAB[ids == c])) == 1 for c in range(0, st["num_clusters"], 50)])
    assert pure > 0.5, pure  # ~65 rows of a blob per window: most clusters of 16 are one blob (random: none)


# ---- a real 2-process gloo group ------------------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import samplers.ngame as ngm
    import samplers.ngame_windowed as ngw

    ngm.EXACT_MAX_ROWS, ngm.WINDOW_ROWS = THRESHOLD, WINDOW
    ngw.SCAN_ROWS = SCAN  # several assignment chunks per rank
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        s = NGAMEBatchSampler(N, batch_size=64, cluster_size=16, warmup_epochs=1, refresh_every=1, seed=3,
                              bank_path=os.path.join(out_dir, "shared_bank.npy"))
        s.set_epoch(0)
        e0 = list(s)
        for b in e0:  # each rank writes the rows of its own batches into the shared bank file
            s.update_embeddings(b, EMB[b])
        s.set_epoch(1)  # collective: rank r clusters windows r, r + 2, ...
        e1 = list(s)
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), e0=np.concatenate(e0), e1=np.concatenate(e1),
                 n1=len(e1), digest=s.state_dict()["clusters_digest"])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned ranks importing torch: 6-17 s on the shared 2-core machine
def test_two_gloo_ranks_cluster_windows_into_one_file(tmp_path, monkeypatch):
    monkeypatch.setattr(ngw, "SCAN_ROWS", SCAN)
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r = [np.load(tmp_path / f"rank{k}.npz") for k in range(2)]
    for key in ("e0", "e1"):
        assert sorted(np.concatenate([r[0][key], r[1][key]]).tolist()) == list(range(N)), key
    assert int(r[0]["n1"]) == int(r[1]["n1"]) and str(r[0]["digest"]) == str(r[1]["digest"])
    # the clustering one process makes from the same bank, windows all its own (no process group here)
    for k in range(2):
        one = NGAMEBatchSampler(N, batch_size=64, cluster_size=16, warmup_epochs=1, refresh_every=1, seed=3,
                                rank=k, world_size=2, bank_path=tmp_path / "one.npy")
        if k == 0:
            one.update_embeddings(np.arange(N), EMB)
        one.set_epoch(1)
        assert one.state_dict()["clusters_digest"] == str(r[k]["digest"])
        np.testing.assert_array_equal(np.concatenate(list(one)), r[k]["e1"])
