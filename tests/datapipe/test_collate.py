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
    base = a.base
    del a
    gc.collect()
    c = pool.alloc((2, 8), np.int64)  # a's buffer came back and is reused
    assert c.base is base and pool.idle_bytes == 0
    # every batch of an epoch kept alive stays intact while later batches are produced
    f = collate.pad()
    idx = [np.arange(i, i + 10) for i in range(0, 80, 10)]
    kept = [f(small_ds.__getitems__(i)) for i in idx]
    for i, out in zip(idx, kept):
        fresh = f(small_ds.__getitems__(i))
        assert torch.equal(out["input_ids"], fresh["input_ids"]) and torch.equal(out["labels"], fresh["labels"])
