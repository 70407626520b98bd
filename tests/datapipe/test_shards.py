"""Batches spanning many shards: one kernel call per column (native.shards) gives what row-by-row reads give, through
the dataset, the collators (serial and parallel kernels) and the DataLoader (issue 17: a random batch of a dataset
of many shards touches nearly every shard)."""

import numpy as np
import pytest
import torch

import datapipe
from datapipe import collate
from datapipe.dataset import Ragged
from native.shards import gather_shard_values, pad_shard_rows


def rows(n, seed=0, strings=False, nulls=False):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        r = {"input_ids": rng.integers(0, 50_000, int(rng.integers(0, 40)), dtype=np.int32), "id": i,
             "score": np.float32(i / 7)}
        if strings:
            r["name"] = f"row{i}"
        if nulls:  # a list column that is not token ids may hold a null list (one shard then reads generically)
            r["feats"] = None if i == n - 3 else rng.integers(0, 9, 3, dtype=np.int32)
        out.append(r)
    return out


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    data = rows(300)
    path = datapipe.write_dataset(data, tmp_path_factory.mktemp("many") / "ds", shard_rows=7)  # 43 shards
    return datapipe.ArrowDataset.open(path), data


def batches(n, seed=1):
    rng = np.random.default_rng(seed)
    out = [rng.choice(n, 64, replace=False), rng.integers(-n, n, 100), np.array([5, 5, 5, 299, 0]),
           np.arange(n)[::-1]]
    return [np.asarray(b, dtype=np.int64) for b in out]


def test_a_batch_over_many_shards_equals_its_rows(many):
    ds, data = many
    assert ds.num_shards > 40
    for idx in batches(len(data)):
        b = ds.__getitems__(idx)
        col = b["input_ids"]
        assert col.shards is not None  # the one-call path
        want = [data[int(i)]["input_ids"] for i in idx]
        assert [x.tolist() for x in col] == [w.tolist() for w in want]
        assert b["id"].tolist() == [data[int(i)]["id"] for i in idx]
        assert np.allclose(b["score"], [data[int(i)]["score"] for i in idx])
        # parts derived from the shard rows describe the same rows (what other consumers read)
        again = Ragged(None, col.offsets, parts=col.parts)
        assert [x.tolist() for x in again] == [w.tolist() for w in want]


@pytest.mark.parametrize("parallel", [False, True])
def test_the_one_call_kernels_equal_the_per_shard_layouts(many, parallel):
    ds, data = many
    for idx in batches(len(data), seed=2):
        col = ds.__getitems__(idx)["input_ids"]
        src, ref = col.shards, Ragged.from_list([data[int(i)]["input_ids"] for i in idx], dtype=np.int32)
        values = np.full(int(col.offsets[-1]), -1, dtype=np.int64)
        gather_shard_values(src.off_addr, src.val_addr, src.shard, src.local, col.offsets, values, src.off_like,
                            src.val_like, parallel=parallel)
        assert values.tolist() == ref.values.tolist()
        L = 25  # shorter than the longest row: truncated
        ids, mask, labels = (np.full((len(idx), L), 9, np.int64) for _ in range(3))
        pad_shard_rows(src.off_addr, src.val_addr, src.shard, src.local, src.off_like, src.val_like, ids, mask,
                       labels, pad_id=0, label_pad=-100, parallel=parallel)
        for b, w in enumerate(ref):
            n = min(len(w), L)
            assert ids[b, :n].tolist() == w[:n].tolist() and (ids[b, n:] == 0).all()
            assert mask[b].sum() == n and (labels[b, n:] == -100).all()


@pytest.mark.parametrize("make", [collate.pad, collate.packed])
def test_collators_over_many_shards_equal_them_over_the_rows(many, make):
    ds, data = many
    f = make(keep_columns=False)
    for _ in range(3):  # a few calls: the kernel mode tries serial and parallel kernels
        for idx in batches(len(data), seed=3):
            got = f(ds.__getitems__(idx))
            want = f([{"input_ids": data[int(i)]["input_ids"]} for i in idx])
            assert got.keys() == want.keys()
            for k in got:
                assert torch.equal(got[k], want[k]) if isinstance(got[k], torch.Tensor) else got[k] == want[k], k


def test_columns_the_kernels_cannot_read_take_the_generic_path(tmp_path):
    for kw in ({"strings": True}, {"nulls": True}):
        data = rows(60, seed=4, **kw)
        ds = datapipe.ArrowDataset.open(datapipe.write_dataset(data, tmp_path / str(sorted(kw)), shard_rows=5))
        idx = np.random.default_rng(5).choice(60, 30, replace=False)
        b = ds.__getitems__(idx)
        assert b["id"].tolist() == idx.tolist()
        if "strings" in kw:
            assert b["name"] == [f"row{i}" for i in idx]
            assert [x.tolist() for x in b["input_ids"]] == [data[int(i)]["input_ids"].tolist() for i in idx]
        else:
            assert 57 in idx.tolist()
            got = b["feats"]
            got = got if isinstance(got, list) else [x for x in got]
            for g, i in zip(got, idx):
                w = data[int(i)]["feats"]
                assert (g is None) if w is None else list(g) == w.tolist()
            assert [x.tolist() for x in b["input_ids"]] == [data[int(i)]["input_ids"].tolist() for i in idx]


def test_batches_over_many_shards_through_the_loader_with_workers(many):
    ds, data = many
    sampler = [b for b in batches(len(data), seed=6)]
    f = collate.packed(keep_columns=True)
    a = list(datapipe.DataLoader(ds, batch_sampler=sampler, collate_fn=f))
    b = list(datapipe.DataLoader(ds, batch_sampler=sampler, collate_fn=f, num_workers=2))
    for x, y, idx in zip(a, b, sampler):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["id"], y["id"])
        assert x["id"].tolist() == [data[int(i)]["id"] for i in idx]


def test_threads_opening_shards_side_by_side_read_the_right_rows(many):
    from concurrent.futures import ThreadPoolExecutor

    _, data = many
    ds = datapipe.ArrowDataset.open(many[0].path)  # no shard open yet
    f = collate.packed(keep_columns=False)
    idx = batches(len(data), seed=7) * 4

    def one(i):
        return f(ds.__getitems__(i))["input_ids"]

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(one, idx))
    for g, i in zip(got, idx):
        assert g.tolist() == np.concatenate([data[int(j)]["input_ids"] for j in i]).tolist()
