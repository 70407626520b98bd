import numpy as np
import pytest
import torch

from datapipe import collate


@pytest.fixture
def batch(small_ds):
    return small_ds.__getitems__([3, 10, 50, 96])


def test_pad_from_batch_and_from_rows_agree(small_ds, batch):
    f = collate.pad(pad_id=7, pad_to_multiple_of=8)
    a = f(batch)
    b = f([small_ds[i] for i in [3, 10, 50, 96]])
    for k in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(a[k], b[k])
    L = batch["input_ids"].lengths
    assert a["input_ids"].shape == (4, -(-L.max() // 8) * 8) and a["input_ids"].dtype == torch.int64
    for j in range(4):
        n = L[j]
        assert a["input_ids"][j, :n].tolist() == batch["input_ids"][j].tolist()
        assert (a["input_ids"][j, n:] == 7).all() and (a["labels"][j, n:] == -100).all()
        assert a["attention_mask"][j].sum() == n
    assert torch.equal(a["score"], torch.tensor(batch["score"]))


def test_packed(batch, small_ds):
    out = collate.packed()(batch)
    L = batch["input_ids"].lengths
    assert out["cu_seqlens"].dtype == torch.int32 and out["cu_seqlens"].tolist() == [0, *np.cumsum(L).tolist()]
    assert out["input_ids"].tolist() == np.concatenate(list(batch["input_ids"])).tolist()
    assert out["max_seqlen"] == L.max()
    starts = out["cu_seqlens"][:-1].long()
    nonempty = starts[torch.as_tensor(L) > 0]
    assert (out["labels"][nonempty] == -100).all() and (out["position_ids"][nonempty] == 0).all()
    rows = collate.packed()([small_ds[i] for i in [3, 10, 50, 96]])
    assert torch.equal(rows["input_ids"], out["input_ids"]) and torch.equal(rows["cu_seqlens"], out["cu_seqlens"])


def test_rows_as_lists_and_tensors():
    rows = [{"input_ids": [1, 2, 3]}, {"input_ids": torch.tensor([4])}]
    out = collate.pad()(rows)
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    with pytest.raises(KeyError, match="no column 'tokens'"):
        collate.pad(column="tokens")(rows)


def test_max_length_truncates():
    out = collate.pad(max_length=2)([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}])
    assert out["input_ids"].tolist() == [[1, 2], [4, 0]]


def test_recycled_buffers_never_alias_live_batches(small_ds):
    import gc

    from datapipe.collate._pool import BufferPool

    pool = BufferPool()
    a = pool.alloc((4, 8), np.int64)
    a[:] = 7
    b = pool.alloc((4, 8), np.int64)  # a is alive: b must not share its memory
    assert not np.shares_memory(a, b)
    base = id(a.base)  # not a reference: a held buffer is never reused
    del a
    gc.collect()
    c = pool.alloc((2, 8), np.int64)  # a's buffer came back and is reused
    assert id(c.base) == base and pool.idle_bytes == 0
    t = torch.from_numpy(c)  # a tensor over the array keeps the buffer lent
    del c
    d = pool.alloc((2, 8), np.int64)
    assert not np.shares_memory(t.numpy(), d)
    del t, d
    assert pool.collect() > 0  # both buffers came back
    # every batch of an epoch kept alive stays intact while later batches are produced
    f = collate.pad()
    idx = [np.arange(i, i + 10) for i in range(0, 80, 10)]
    kept = [f(small_ds.__getitems__(i)) for i in idx]
    for i, out in zip(idx, kept):
        fresh = f(small_ds.__getitems__(i))
        assert torch.equal(out["input_ids"], fresh["input_ids"]) and torch.equal(out["labels"], fresh["labels"])


@pytest.mark.parametrize("make", [collate.pad, collate.packed])
def test_int32_ids_option_gives_the_same_values(small_ds, make):
    idx = np.array([5, 41, 0, 77, 96, 22])  # rows of 5 shards, out of order
    ref = make()(small_ds.__getitems__(idx))
    out = make(dtype=torch.int32)(small_ds.__getitems__(idx))
    other = "attention_mask" if "attention_mask" in ref else "position_ids"
    for k in ("input_ids", other):
        assert out[k].dtype == torch.int32 and torch.equal(out[k].long(), ref[k])
    assert out["labels"].dtype == torch.int64 and torch.equal(out["labels"], ref["labels"])
    out = make(dtype="int32", label_dtype="int32")(small_ds.__getitems__(idx))
    assert out["labels"].dtype == torch.int32 and torch.equal(out["labels"].long(), ref["labels"])
    with pytest.raises(ValueError, match="dtype must be int32 or int64.*float32"):
        make(dtype=torch.float32)


def test_fused_path_equals_the_materialised_batch(small_ds):
    """Collating the unmaterialised batch (kernels read the shards) gives what collating its gathered values
    gives, and a pickled batch carries its values, not the shards."""
    import pickle

    from datapipe.dataset import Ragged

    idx = np.array([96, 3, 3, 60, 19, 20, 0])
    batch = small_ds.__getitems__(idx)
    col = batch["input_ids"]
    assert col.parts is not None and len(col.parts) == 4  # shards 4, 0, 3, 1
    fused = {f: f(batch) for f in (collate.pad(pad_to_multiple_of=4), collate.packed())}
    copy = pickle.loads(pickle.dumps(batch))
    assert copy["input_ids"].parts is None and copy.num_rows == 7
    plain = dict(batch, input_ids=Ragged(col.values.copy(), col.offsets.copy()))
    for f, out in fused.items():
        for src in (copy, plain):
            ref = f(src)
            assert all(torch.equal(out[k], ref[k]) for k in out if isinstance(out[k], torch.Tensor))
    assert [r.tolist() for r in col] == [small_ds[int(i)]["input_ids"].tolist() for i in idx]


def test_kernel_mode_follows_the_measured_costs(monkeypatch):
    import datapipe.collate._parallel as par
    from datapipe.collate._parallel import KernelMode

    busy = [True]
    monkeypatch.setattr(par, "_busy", lambda: busy[0])
    m = KernelMode(explore_every=4, max_wait=1e9)
    for _ in range(6):  # cores taken: parallel kernels are not even tried
        p = m.pick()
        assert p is False
        m.record(p, 2.0, 1)
    busy[0] = False
    m = KernelMode(explore_every=4, max_wait=1e9)
    seq = []
    for _ in range(4):  # warm-up call and one measurement per mode: serial first
        p = m.pick()
        seq.append(p)
        m.record(p, 1.0 if p else 2.0, 1)  # parallel is 2x faster
    assert seq == [False, False, True, True]
    picks = []
    for _ in range(40):
        p = m.pick()
        picks.append(p)
        m.record(p, 1.0 if p else 2.0, 1)
    # serial tried for 4 calls in a row after 4 calls, lost, then 8 and 16 calls after each try
    assert [i for i, p in enumerate(picks) if not p] == [3, 4, 5, 6, 14, 15, 16, 17, 33, 34, 35, 36]
    monkeypatch.setattr(par, "may_parallelize", lambda: False)  # in workers and prefetch threads
    assert m.pick() is False


def test_kernel_mode_is_not_turned_by_one_slow_call_or_a_cold_try(monkeypatch):
    import datapipe.collate._parallel as par
    from datapipe.collate._parallel import KernelMode

    monkeypatch.setattr(par, "_busy", lambda: False)
    m = KernelMode(explore_every=4, max_wait=1e9)
    for _ in range(4):  # warm-up: serial 2.0, parallel 1.0 per unit
        p = m.pick()
        m.record(p, 1.0 if p else 2.0, 1)
    picks = []
    for i in range(12):
        p = m.pick()
        picks.append(p)
        m.record(p, 50.0 if i == 1 else (1.0 if p else 2.0), 1)  # one preempted parallel call
    assert picks[1] and picks[2] and picks[8:].count(True) >= 1  # the slow call did not switch parallel off
    assert m.cost(True) == 1.0
    # parallel preferred by its measurements, but serial has run for a while: the try's first (cold) parallel
    # call is slow; it is not counted, the try's other calls are, and parallel wins back
    m = KernelMode(explore_every=4, max_wait=1e9)
    for _ in range(4):
        p = m.pick()
        m.record(p, 3.0 if p else 2.0, 1)  # parallel slower at first (the machine was busy)
    seen, cold = [], True
    for _ in range(30):
        p = m.pick()
        seen.append(p)
        if p and cold:
            m.record(p, 40.0, 1)  # waking the threads
            cold = False
        else:
            m.record(p, 1.0 if p else 2.0, 1)  # the machine is quiet now: parallel 2x faster
    assert seen[:3] == [False] * 3 and seen[3:10] == [True] * 7 and m.cost(True) == 1.0



def test_kernel_mode_tries_the_other_mode_after_max_wait_seconds(monkeypatch):
    import time as _time

    import datapipe.collate._parallel as par
    from datapipe.collate._parallel import KernelMode

    monkeypatch.setattr(par, "_busy", lambda: False)
    m = KernelMode(explore_every=10**6, max_wait=0.05)
    for _ in range(4):  # serial measured faster
        p = m.pick()
        m.record(p, 3.0 if p else 1.0, 1)
    assert [m.pick() for _ in range(3)] == [False] * 3
    _time.sleep(0.06)
    assert m.pick() is True  # a try of parallel, although far fewer than explore_every calls went by

# ---- decomposed batches (Pouransari et al., 2024) ---------------------------------------------------------------
from datapipe.decomposed_buckets import gather_sequences  # noqa: E402
from native.ragged import concat_ranges  # noqa: E402


def boundaries_reference(index, seq: np.ndarray, pieces: np.ndarray, L: int, label_pad: int, ids: np.ndarray):
    """cu_seqlens, position ids, labels and the real-token mask of a ``[b, L]`` batch."""
    b = len(seq)
    so = index.sequence_offsets
    npieces = so[seq + 1] - so[seq]
    plen = index.length[pieces]
    pad = L - index.sequence_tokens[seq]
    # segments: each row's pieces, then its padding (when any) as one more segment
    ends = np.cumsum(npieces)
    seg = np.insert(plen, ends[pad > 0], pad[pad > 0])
    seg_start = np.concatenate([[0], np.cumsum(seg)[:-1]])
    cu = np.zeros(len(seg) + 1, dtype=np.int32)
    np.cumsum(seg, out=cu[1:])
    pos = np.arange(b * L, dtype=np.int64) - np.repeat(seg_start, seg)
    mask = np.ones(b * L, dtype=bool)
    pad_rows = np.flatnonzero(pad > 0)
    if len(pad_rows):
        mask[concat_ranges(pad_rows * L + L - pad[pad_rows], pad[pad_rows])] = False
    labels = ids.reshape(-1).astype(np.int64)
    labels[seg_start] = label_pad  # no segment learns from the one before it (after the model's shift)
    labels[~mask] = label_pad
    return cu, pos.reshape(b, L), labels.reshape(b, L), mask.reshape(b, L), int(seg.max()) if len(seg) else 0



@pytest.fixture(scope="module")
def decomposed(tmp_path_factory):
    import datapipe

    rng = np.random.default_rng(0)
    lens = np.maximum(1, rng.lognormal(5.0, 1.1, 200).astype(np.int64))
    path = tmp_path_factory.mktemp("dd") / "ds"
    datapipe.write_dataset([{"input_ids": rng.integers(0, 300, n).astype(np.int32)} for n in lens], path,
                           shard_rows=40)
    return path, datapipe.decompose(path, min_log2=4, max_log2=9, remainder="pad", seed=1)


def test_decomposed_batches_match_the_numpy_reference(decomposed):
    from datapipe.decomposed_dataset import DecomposedDataset
    from samplers.decomposed import DecomposedBatchSampler

    path, index = decomposed
    ds, ds32 = DecomposedDataset(path), DecomposedDataset(path, dtype=torch.int32)
    padded = 0
    for seq in DecomposedBatchSampler(index, tokens_per_batch=1024, seed=0):
        got = ds.__getitems__(seq)
        ids, pieces = gather_sequences(ds.dataset, index, seq)  # whole rows gathered, then numpy passes
        cu, pos, labels, mask, max_seqlen = boundaries_reference(index, seq, pieces, ids.shape[1], -100, ids)
        assert torch.equal(got["input_ids"], torch.from_numpy(ids.astype(np.int64)))
        assert torch.equal(got["labels"], torch.from_numpy(labels))
        assert torch.equal(got["attention_mask"], torch.from_numpy(mask.astype(np.int64)))
        assert torch.equal(got["position_ids"], torch.from_numpy(pos))
        assert torch.equal(got["cu_seqlens"], torch.from_numpy(cu)) and got["max_seqlen"] == max_seqlen
        padded += int((~mask).sum())
        small = ds32.__getitems__(seq)
        assert small["input_ids"].dtype == torch.int32 and small["labels"].dtype == torch.int64
        assert torch.equal(small["input_ids"].long(), got["input_ids"])
    assert padded > 0  # the padded remainders were exercised


def test_decomposed_dataset_pickles_a_user_index(decomposed):
    import pickle
    from types import SimpleNamespace

    from datapipe.decomposed_dataset import DecomposedDataset

    path, index = decomposed
    names = ("row", "start", "length", "sequence", "sequence_log2", "sequence_tokens", "sequence_offsets")
    mine = SimpleNamespace(**{k: np.array(getattr(index, k)) for k in names})  # not stored anywhere
    keep = np.flatnonzero(index.sequence_log2 == 4)[:5]
    ds = DecomposedDataset(path, mine)
    copy = pickle.loads(pickle.dumps(ds))
    assert isinstance(copy.index, SimpleNamespace)
    a, b = ds.__getitems__(keep), copy.__getitems__(keep)
    assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "cu_seqlens", "position_ids"))
    stored = pickle.loads(pickle.dumps(DecomposedDataset(path)))  # the stored index is reopened, not copied
    assert type(stored.index).__name__ == "DecomposedIndex"


# ---- speech features -------------------------------------------------------------------------------------------
@pytest.fixture
def feats_ds(tmp_path):
    import datapipe

    rng = np.random.default_rng(0)
    rows = [{"features": rng.standard_normal(3 * int(n)).astype(np.float32), "feature_dim": 3, "num_frames": int(n)}
            for n in rng.integers(1, 30, 50)]
    return datapipe.ArrowDataset.open(datapipe.write_dataset(rows, tmp_path / "feats", shard_rows=16))


def test_features_collator_is_picklable_and_reads_the_shards_once(feats_ds):
    import pickle

    f = collate.features_collator(feature_dim=3, keep_columns=False)
    g = pickle.loads(pickle.dumps(f))
    assert isinstance(g, collate.FeaturesCollate) and g.feature_dim == 3
    idx = np.array([49, 2, 17, 33, 2])  # 4 shards, a repeated row
    batch = feats_ds.__getitems__(idx)
    assert batch["features"].parts is not None
    out = g(batch)
    rows = [feats_ds[int(i)]["features"] for i in idx]
    assert torch.equal(out["features"], torch.from_numpy(np.concatenate(rows)).view(-1, 3))
    assert out["cu_seqlens"].tolist() == [0, *np.cumsum([len(r) // 3 for r in rows]).tolist()]
    with pytest.raises(ValueError, match="feature_dim must be an integer >= 1"):
        collate.features_collator(feature_dim=0)


def test_features_collator_in_a_spawned_worker(feats_ds):
    import datapipe

    loader = datapipe.DataLoader(feats_ds, batch_size=16, collate_fn=collate.features_collator(feature_dim=3),
                                 num_workers=1, multiprocessing_context="spawn")
    got = [b["features"] for b in loader]
    ref = [collate.collate_features(feats_ds.__getitems__(np.arange(a, min(a + 16, 50))))["features"]
           for a in range(0, 50, 16)]
    assert len(got) == 4 and all(torch.equal(a, b) for a, b in zip(got, ref))


def test_the_pool_keeps_the_recently_used_buffers_within_its_bound():
    from datapipe.collate._pool import BufferPool

    pool = BufferPool(max_bytes=10_000)
    big = [pool.alloc(4000, np.uint8) for _ in range(2)]  # another layout's buffers fill the pool when returned
    del big
    assert pool.collect() <= 10_000
    small = pool.alloc(500, np.uint8)
    base = id(small.base)
    del small
    pool.collect()
    again = pool.alloc(500, np.uint8)  # the small buffer came back and is reused, although big ones were idle
    assert id(again.base) == base and pool.idle_bytes <= 10_000
    del again
    fresh = pool.fresh
    for _ in range(20):  # a steady loop of small batches allocates nothing new
        x = pool.alloc(480, np.uint8)
        del x
    assert pool.fresh == fresh
