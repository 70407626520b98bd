import json
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import datapipe
from datapipe.dataset import Batch, Ragged
from datapipe.format import DatasetError, seal_manifest


def test_getitems_matches_getitem(small_ds, rows):
    idx = np.array([5, 96, 0, 0, 41, -1, 20, 19])
    b = small_ds.__getitems__(idx)
    assert isinstance(b, Batch) and b.num_rows == len(idx)
    assert isinstance(b["input_ids"], Ragged) and b["input_ids"].offsets.dtype == np.int64
    for j, i in enumerate(idx):
        r = rows[i]
        assert b["input_ids"][j].tolist() == r["input_ids"]
        assert b["text"][j] == r["text"] and b["score"][j] == r["score"] and b["domain"][j] == r["domain"]
    assert [r["text"] for r in b.rows()] == [rows[i]["text"] for i in idx]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(idx=st.lists(st.integers(0, 96), max_size=60))
def test_getitems_any_order_property(small_ds, rows, idx):
    b = small_ds.__getitems__(idx)
    assert [b["input_ids"][j].tolist() for j in range(len(idx))] == [rows[i]["input_ids"] for i in idx]


def test_getitem_is_a_zero_copy_view(small_ds):
    a = small_ds[3]["input_ids"]
    assert not a.flags.owndata and not a.flags.writeable  # a view into the memory-mapped shard


def test_out_of_range_and_bad_index(small_ds):
    with pytest.raises(IndexError, match="row 97 is out of range"):
        small_ds[97]
    with pytest.raises(IndexError, match="out of range"):
        small_ds.__getitems__([1, 200])
    with pytest.raises(TypeError, match="index must be an int"):
        small_ds["a"]


def test_pickle_reopens(small_ds):
    ds2 = pickle.loads(pickle.dumps(small_ds))
    assert ds2[7]["input_ids"].tolist() == small_ds[7]["input_ids"].tolist()


def test_missing_manifest(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(DatasetError, match="no manifest.json"):
        datapipe.ArrowDataset.open(tmp_path / "x")
    with pytest.raises(DatasetError, match="no such dataset directory"):
        datapipe.ArrowDataset.open(tmp_path / "missing")


def test_truncated_shard_is_named(small_ds):
    shard = small_ds.path / "shards" / "00002.arrow"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"00002\.arrow.*truncated"):
        datapipe.ArrowDataset.open(small_ds.path)


def test_checksum_mismatch_is_named(small_ds):
    shard = small_ds.path / "shards" / "00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))
    ds = datapipe.ArrowDataset.open(small_ds.path)
    with pytest.raises(DatasetError, match=r"00001\.arrow: checksum mismatch"):
        ds.verify()


def test_schema_mismatch_in_shard(small_ds, tmp_path):
    other = datapipe.write_dataset([{"input_ids": [1, 2], "z": 1}] * 20, tmp_path / "other", shard_rows=20)
    other_manifest = json.loads((other / "manifest.json").read_text())
    src = other / "shards" / "00000.arrow"
    dst = small_ds.path / "shards" / "00000.arrow"
    dst.write_bytes(src.read_bytes())
    m = json.loads((small_ds.path / "manifest.json").read_text())
    m["shards"][0]["bytes"] = src.stat().st_size
    m["shards"][0]["checksum"] = other_manifest["shards"][0]["checksum"]
    (small_ds.path / "manifest.json").write_text(seal_manifest(m))  # a consistent manifest over a foreign shard
    ds = datapipe.ArrowDataset.open(small_ds.path)
    with pytest.raises(DatasetError, match=r"00000\.arrow: schema"):
        ds[0]


def test_index_is_numpy(small_ds, rows):
    L = small_ds.index["length"]
    assert isinstance(L, np.ndarray) and L.dtype == np.int64
    assert L.tolist() == [len(r["input_ids"]) for r in rows]
