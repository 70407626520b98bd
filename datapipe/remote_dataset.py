"""``RemoteArrowDataset``: an ``ArrowDataset`` whose directory is on object storage, read through a bounded
local shard cache: shards kept open (mapped from the cache, pinned while mapped) are gathered in place by the local
dataset's kernels, others have their rows copied out; plan-ordered prefetch on a background thread.

``ArrowDataset.open(url, ...)`` returns one (through the opener ``datapipe/__init__.py`` registers in
``datapipe.urls``). Part of ``datapipe.remote`` (see its docstring for the whole design).
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import pickle
import tempfile
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch.utils.data
from numpy.typing import NDArray

from datapipe.dataset import ArrowDataset, Batch, shard_from_batch
from datapipe.format import (MANIFEST, DatasetError, check_manifest, parse_json, schema_from_b64,
                             shard_starts, verify_buffer)
from datapipe.remote_cache import ShardCache
from datapipe.remote_gather import gather_shards
from datapipe.remote_io import DEFAULT_TIMEOUT, download, read_object
from datapipe.remote_prefetch import Wanted, prefetch_loop
from datapipe.urls import join_key, resolve
from native.ragged import locate_rows

__all__ = ["RemoteArrowDataset"]


_DATASETS: weakref.WeakSet = weakref.WeakSet()


def _after_fork() -> None:  # another thread may hold a dataset's lock at fork time: the child gets a fresh one
    for ds in list(_DATASETS):
        ds._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


class _Held(NamedTuple):
    """A shard kept open: mapped from the cache (pinned while mapped) and its size in the cache."""

    shard: object
    nbytes: int


class RemoteArrowDataset(ArrowDataset):
    """An :class:`ArrowDataset` whose directory is on object storage, read through a bounded local cache.

    Use ``ArrowDataset.open(url, filesystem=..., cache_dir=..., cache_limit=...)``.

    Args:
        url: ``s3://bucket/ds`` (any URL ``pyarrow.fs`` resolves), or a path inside ``filesystem``.
        filesystem: a configured ``pyarrow.fs.FileSystem`` (the URL's scheme is then dropped).
        cache_dir: where shards are cached (default: ``<tmp>/datapipe-cache/<hash of the URL>``); shared by the
            processes that use the same directory.
        cache_limit: bytes the cache directory may hold (``None``: unbounded). Smaller than one shard works too:
            shards then stream through memory.
        timeout: seconds to keep retrying a store that fails before a :class:`DatasetError`.
        keep_open: bytes of shards one process keeps open between batches (mapped from the cache, and so pinned:
            no reader evicts them), read in place like a local dataset's shards. Default (``None``): every touched
            shard when ``cache_limit`` is ``None``, else ``cache_limit / 2`` shared by the DataLoader workers.

    Attributes:
        url: the dataset's URL (``path`` holds it too, as a string).
        filesystem: the ``pyarrow.fs`` filesystem.
        cache: the :class:`ShardCache`.
    """

    is_remote = True

    def __init__(self, url, *, filesystem: pafs.FileSystem | None = None, cache_dir: str | os.PathLike | None = None,
                 cache_limit: float | None = None, timeout: float = DEFAULT_TIMEOUT, keep_open: int | None = None,
                 _manifest: dict | None = None):
        if cache_limit is not None and (not isinstance(cache_limit, (int, float, np.integer, np.floating))
                                        or not cache_limit >= 0):
            raise ValueError(f"cache_limit must be a number of bytes >= 0, or None for no bound (got {cache_limit=})")
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a number of seconds > 0 (got {timeout=})")
        if keep_open is not None and (isinstance(keep_open, bool) or not isinstance(keep_open, (int, np.integer))
                                      or keep_open < 0):
            raise ValueError(f"keep_open must be a number of bytes >= 0, or None for the default (got {keep_open=})")
        self.url = os.fspath(url)
        self._fs, self._root = resolve(self.url, filesystem)
        self._fs_pid = os.getpid()
        self._fs_given = filesystem is not None
        self.path = self.url  # the base class names the dataset by .path in messages
        self.timeout = float(timeout)
        self.verify_mode = "first_touch"  # files are checked on arrival, and cached ones once per process
        if cache_dir is None:
            key = hashlib.sha1(f"{type(self.filesystem).__name__}:{self._root}".encode()).hexdigest()[:16]
            cache_dir = Path(tempfile.gettempdir()) / "datapipe-cache" / key
        self.cache = ShardCache(cache_dir, None if cache_limit is None else int(cache_limit))
        self.manifest = _manifest if _manifest is not None else self._read_manifest()
        self.schema = schema_from_b64(self.manifest["schema"], self._url_of(MANIFEST))
        shards = self.manifest["shards"]
        self._starts = shard_starts(self.manifest, self._url_of(MANIFEST))
        self._shards = [None] * len(shards)
        self._index = None
        self._checked: set[tuple[str, int]] = set()  # cached files this process has checked
        self._prefetch: tuple[threading.Thread, threading.Event] | None = None
        # shards kept open between batches (mapped from the cache, so pinned), least recently used first
        self.keep_open = None if keep_open is None else int(keep_open)
        self._open: OrderedDict[int, _Held] = OrderedDict()
        self._open_bytes = 0
        self._budget: tuple[int, int | None] = (-1, None)  # (pid, bytes) of _keep_budget
        self._lock = threading.Lock()
        _DATASETS.add(self)

    @property
    def filesystem(self) -> pafs.FileSystem:
        """The ``pyarrow.fs`` filesystem, one per process: a forked child (a DataLoader worker) gets its own copy
        (rebuilt from the parent's configuration) on first use. The parent's client keeps pooled connections to the
        store; a child using them shares a socket with its parent and siblings, and replies go astray (requests
        then hang until the client's request timeout: 20 s stalls seen with 2 workers before)."""
        if self._fs_pid != os.getpid():
            self._fs_pid = os.getpid()
            try:
                self._fs = pickle.loads(pickle.dumps(self._fs))
            except Exception as e:  # noqa: BLE001  any failure to copy: used as it is, and said
                warnings.warn(f"{self.url}: the filesystem ({type(self._fs).__name__}) could not be copied for "
                              f"process {os.getpid()} ({e}); it shares its parent's connections, which can stall "
                              "requests: pass a filesystem that pickles, or DataLoader(multiprocessing_context="
                              "'spawn')", RuntimeWarning, stacklevel=2)
        return self._fs

    def _url_of(self, name: str) -> str:
        return f"{self.url.rstrip('/')}/{name}"

    def _read_manifest(self) -> dict:
        what = self._url_of(MANIFEST)
        try:
            data = read_object(self.filesystem, join_key(self._root, MANIFEST), what, self.timeout)
        except DatasetError as e:
            if "not found in the store" in str(e):
                raise DatasetError(f"{self.url}: no {MANIFEST}: not a datapipe dataset, or an unfinished build or "
                                   "upload (rebuild it)") from None
            raise
        return check_manifest(parse_json(data, what), what)

    # ---- pickling: configuration only --------------------------------------------------------------------
    def __getstate__(self):
        return {"url": self.url, "filesystem": self.filesystem if self._fs_given else None,
                "cache_dir": str(self.cache.dir), "cache_limit": self.cache.limit, "timeout": self.timeout,
                "keep_open": self.keep_open, "manifest": self.manifest}

    def __setstate__(self, state):
        self.__init__(state["url"], filesystem=state["filesystem"], cache_dir=state["cache_dir"],
                      cache_limit=state["cache_limit"], timeout=state["timeout"], keep_open=state.get("keep_open"),
                      _manifest=state["manifest"])

    # ---- shards -------------------------------------------------------------------------------------------
    def _cache_name(self, s: int) -> str:
        meta = self.manifest["shards"][s]
        digest = meta["checksum"].split(":", 1)[-1][:16]
        return f"{meta['file'].replace('/', '__').removesuffix('.arrow')}-{digest}.arrow"

    def _keep_budget(self) -> int | None:
        """Bytes of shards this process keeps open between batches (``None``: every touched shard)."""
        pid = os.getpid()
        if self._budget[0] != pid:  # a DataLoader worker shares the default with its siblings
            info = torch.utils.data.get_worker_info()
            budget = (int(self.keep_open) if self.keep_open is not None else None if self.cache.limit is None
                      else self.cache.limit // 2 // max(1, info.num_workers if info is not None else 1))
            self._budget = (pid, budget)
        return self._budget[1]

    def _open_cached(self, s: int, *, again: bool = False) -> _Held | None:
        """Shard ``s`` mapped from the cache (downloaded first if absent) and pinned for as long as the map lives;
        ``None`` when the cache has no room for it. A cached copy that fails its first-touch check (damaged on the
        local disk) is dropped and downloaded again, once."""
        meta = self.manifest["shards"][s]
        what = self._url_of(meta["file"])
        src = join_key(self._root, meta["file"])
        name = self._cache_name(s)

        def fetch(part: Path) -> None:
            download(self.filesystem, src, meta, what, self.timeout, part)

        fd, downloaded = self.cache.acquire(name, meta["bytes"], fetch, deadline=time.monotonic() + self.timeout,
                                            what=what)
        if fd is None:
            return None
        label = f"{self.cache.dir / name} (the cached copy of {what})"
        try:
            ino = os.fstat(fd).st_ino
            # the map holds its own duplicate of fd, so the shared flock (the pin) lasts exactly as long as the map:
            # until this shard is dropped from the open set and the last batch that reads it is gone
            mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ) if os.fstat(fd).st_size else None
        finally:
            self.cache.release(fd)
        key = (name, ino)
        first = key not in self._checked
        ok = mm is not None and len(mm) == meta["bytes"]
        buf = pa.py_buffer(mm) if ok else None
        if ok and first and not downloaded:  # cached by another reader: checked once per process, as local files
            try:
                verify_buffer(buf, meta["checksum"], label)
            except DatasetError:
                ok = False
        if not ok:
            if again:
                raise DatasetError(f"{label}: the cached copy does not match the manifest's size and checksum even "
                                   f"after downloading it again; check the disk of {self.cache.dir}")
            del buf
            if mm is not None:
                with contextlib.suppress(BufferError):
                    mm.close()  # unpin now: discard can then delete the file
            self.cache.discard(name)
            return self._open_cached(s, again=True)
        sh = shard_from_batch(self._read(buf, meta, what, validate=first), meta, self.schema, name=label)
        self._checked.add(key)
        return _Held(sh, meta["bytes"])

    def _read(self, buf: pa.Buffer, meta: dict, what: str, *, validate: bool) -> pa.RecordBatch:
        """The shard's rows over ``buf`` (structurally validated when ``validate``, before any kernel reads them)."""
        try:
            reader = pa.ipc.open_file(buf)
            batch = reader.get_batch(0) if reader.num_record_batches == 1 else \
                reader.read_all().combine_chunks().to_batches()[0]
            if validate:
                batch.validate(full=True)
        except (pa.ArrowException, OSError, IndexError) as e:
            raise DatasetError(f"{what}: cannot read the shard ({type(e).__name__}: {e}); the object is truncated "
                               "or corrupt: rebuild or re-upload the dataset") from None
        if batch.num_rows != meta["rows"]:
            raise DatasetError(f"{what}: {batch.num_rows} rows but the manifest says {meta['rows']}")
        if not batch.schema.equals(self.schema):
            raise DatasetError(f"{what}: schema {batch.schema} differs from the manifest's {self.schema}")
        return batch

    def _streamed(self, s: int):
        """Shard ``s`` read into memory (no room in the cache), checked on arrival."""
        self.cache.stats["streamed"] += 1
        meta = self.manifest["shards"][s]
        what = self._url_of(meta["file"])
        buf = download(self.filesystem, join_key(self._root, meta["file"]), meta, what, self.timeout, None)
        return shard_from_batch(self._read(buf, meta, what, validate=True), meta, self.schema, name=what)

    def _trim(self, budget: int | None, busy: set[int]) -> None:
        """Under ``_lock``: drop open shards, least recently used first, until ``budget`` bytes are left (shards
        of the batch being gathered, ``busy``, stay)."""
        if budget is None:
            return
        for s in list(self._open):
            if self._open_bytes <= budget:
                return
            if s not in busy:
                self._open_bytes -= self._open.pop(s).nbytes

    def _hold(self, s: int, busy: set[int]) -> tuple:
        """Shard ``s`` for the batch being gathered: ``(held, None)`` read in place (mapped and pinned, kept open
        within the budget), or ``(None, shard)`` whose rows are to be copied out now (no room to keep it open, or
        streamed through memory)."""
        with self._lock:
            held = self._open.get(s)
            if held is not None:
                self._open.move_to_end(s)
                self.cache.stats["hits"] += 1
                return held, None
        held = self._open_cached(s)
        if held is None and self._open:  # our own open shards may be what fills the cache: let them go, once
            with self._lock:
                self._trim(0, busy)
            held = self._open_cached(s)
        if held is None:
            return None, self._streamed(s)
        budget = self._keep_budget()
        with self._lock:
            other = self._open.get(s)
            if other is not None:  # another thread opened it meanwhile: one open copy
                return other, None
            if budget is None or held.nbytes <= budget:
                self._open[s] = held
                self._open_bytes += held.nbytes
                self._trim(budget, busy)
                if s in self._open:
                    return held, None
        return None, held.shard  # no room among the open shards: read once, its pin dropped with the batch's copy

    def close(self) -> None:
        """Let go of the open shards (their pins go with the last batch that reads them) and stop prefetching."""
        self.stop_prefetch()
        with self._lock:
            self._open.clear()
            self._open_bytes = 0

    def fetch_file(self, name: str, meta: dict, *, check: bool = True, _again: bool = False
                   ) -> tuple[pa.Buffer, int | None]:
        """One more file of the dataset's directory (``decomposition/pieces.arrow``, ...) through the cache.

        The file is downloaded into the cache (its size and checksum checked on arrival) and memory-mapped from
        there, or read into memory when the cache has no room for it.

        Args:
            name: the file's path relative to the dataset (``/``-separated).
            meta: its manifest entry (``bytes``, ``checksum``).
            check: also check the checksum of a copy another reader cached earlier.

        Returns:
            ``(buffer, pin)``: the bytes, and the cache descriptor that keeps the cached file from eviction while
            the buffer is used (``None`` when read into memory); give it back with ``self.cache.release(pin)``.

        Raises:
            DatasetError: the object is missing, truncated or changed, or the store kept failing.
        """
        what = self._url_of(name)
        src = join_key(self._root, name)
        digest = meta["checksum"].split(":", 1)[-1][:16]
        cname = f"{name.replace('/', '__').rsplit('.', 1)[0]}-{digest}.{name.rsplit('.', 1)[-1]}"
        fd, downloaded = self.cache.acquire(
            cname, meta["bytes"], lambda part: download(self.filesystem, src, meta, what, self.timeout, part),
            deadline=time.monotonic() + self.timeout, what=what)
        if fd is None:  # no room within the bound: through memory (checked on arrival)
            self.cache.stats["streamed"] += 1
            return download(self.filesystem, src, meta, what, self.timeout, None), None
        path = self.cache.dir / cname
        buf = pa.memory_map(str(path), "r").read_buffer()
        if check and not downloaded:
            try:
                verify_buffer(buf, meta["checksum"], f"{path} (the cached copy of {what})")
            except DatasetError:
                del buf
                self.cache.release(fd)
                if _again:
                    raise
                self.cache.discard(cname)  # damaged on the local disk: download again, once
                return self.fetch_file(name, meta, check=check, _again=True)
        return buf, fd

    def _shard(self, s: int):
        raise NotImplementedError("remote shards are opened through the cache by __getitems__ (and kept open there)")

    # ---- rows ---------------------------------------------------------------------------------------------
    def __getitem__(self, i: int) -> dict:
        if isinstance(i, slice):
            return self.__getitems__(np.arange(len(self))[i])
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an int (got {type(i).__name__}); use __getitems__ for batches")
        return self.__getitems__(np.array([i], dtype=np.int64)).rows()[0]

    def __getitems__(self, indices) -> Batch:
        """Gather a batch of rows from the shards it touches.

        A shard kept open (mapped from the cache and pinned) is read in place, as a local dataset reads its shards:
        the batch's list columns are gathered lazily, by one kernel call per column over all its shards, straight
        into the collator's output. The batch holds those shards' maps, and so their pins, until it is dropped.
        A shard that cannot be kept open (no room within the bound) has its rows copied out right away and is let
        go (its pin with it), or is streamed through memory when the cache has no room for it at all.

        Args:
            indices: int array-like ``[B]`` (negative indices count from the end).

        Returns:
            :class:`Batch` as ``ArrowDataset.__getitems__`` returns it.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        B = len(idx)
        if B == 0:
            return Batch({n: [] for n in self.schema.names}, 0, idx)
        shard, local = np.empty(B, dtype=np.int64), np.empty(B, dtype=np.int64)
        bad, _ = locate_rows(self._starts, idx, shard, local)
        if bad >= 0:
            raise IndexError(f"row {int(idx[bad])} is out of range for a dataset of {len(self)} rows ({self.url})")
        need, which = np.unique(shard, return_inverse=True)
        need = need.tolist()
        order = range(len(need))
        if len(need) > 1:
            # open and cached shards first: with a cache smaller than the batch's shards, LRU would otherwise evict
            # each shard just before this batch reaches it (every read a miss); this way the cached ones are hits
            with self._lock:
                opened = {s for s in need if s in self._open}
            order = sorted(order, key=lambda j: 0 if need[j] in opened else
                           1 if (self.cache.dir / self._cache_name(need[j])).exists() else 2)
        shards: list = [None] * len(need)
        busy: set[int] = set()
        copied = None
        for j in order:
            held, sh = self._hold(need[j], busy)
            if held is not None:
                shards[j] = held.shard
                busy.add(need[j])
                continue
            # rows copied out: the map (or the streamed bytes) is let go with this batch's copy
            if copied is None:
                copied = local.copy()
            pos = np.flatnonzero(which == j)
            taken = sh.batch.take(pa.array(local[pos]))
            shards[j] = shard_from_batch(taken, {"rows": len(pos)}, self.schema,
                                         name=f"rows of {self._url_of(self.manifest['shards'][need[j]]['file'])}")
            copied[pos] = np.arange(len(pos), dtype=np.int64)
            del sh, taken
        return gather_shards(shards, which.astype(np.int64, copy=False), local if copied is None else copied, idx,
                       self.schema)

    # ---- prefetch -----------------------------------------------------------------------------------------
    def prefetch_plan(self, batches: Iterable[NDArray[np.int64]]) -> None:
        """Download, on a background thread, the shards the given batches will read, in their order.

        At most ``cache_limit / 2`` bytes of shards not read yet are kept ahead (the rest of the cache serves the
        reads); a prefetched shard is never evicted by the prefetcher before it was read. A new call replaces the
        previous plan. Errors are left to the reads (which retry and report them).

        Args:
            batches: int64 row-index arrays, one per batch, in the order the loader will request them; consumed
                on the background thread (pass a list, or an iterator that nothing else advances).
        """
        self.stop_prefetch()
        stop = threading.Event()
        t = threading.Thread(target=prefetch_loop, args=(self.cache, self._wanted(batches), stop, self.timeout),
                             daemon=True, name="datapipe-remote-prefetch")
        self._prefetch = (t, stop)
        t.start()

    def stop_prefetch(self) -> None:
        """Stop the prefetch thread (a download in flight finishes first)."""
        if self._prefetch is not None:
            t, stop = self._prefetch
            stop.set()
            t.join(timeout=self.timeout + 5)
            self._prefetch = None

    def _wanted(self, batches: Iterable) -> Iterator[Wanted]:
        """The shards ``batches`` read, each where it is first needed (consumed on the prefetch thread)."""
        for rows in batches:
            rows = np.asarray(rows, dtype=np.int64).reshape(-1)
            if not len(rows):
                continue
            shards, first = np.unique(self._locate(rows)[0], return_index=True)
            for s in shards[np.argsort(first)].tolist():
                meta = self.manifest["shards"][s]
                what, src = self._url_of(meta["file"]), join_key(self._root, meta["file"])
                yield (self._cache_name(s), meta["bytes"], what,
                       lambda part, src=src, meta=meta, what=what: download(self.filesystem, src, meta, what,
                                                                            self.timeout, part))

    def cache_stats(self) -> dict:
        """This process's cache counters (hits, downloads, prefetched, streamed, evictions, bytes) and the
        bytes the cache directory holds now."""
        return {**self.cache.stats, "bytes_now": self.cache.used(), "limit": self.cache.limit}

    # ---- metadata -----------------------------------------------------------------------------------------
    def _read_index(self, meta: dict) -> dict[str, NDArray]:
        """The per-row metadata columns (``index.arrow``, read from the store once; ``index`` caches them)."""
        what = self._url_of(meta["file"])
        data = download(self.filesystem, join_key(self._root, meta["file"]), meta, what, self.timeout, None)
        try:
            t = pa.ipc.open_file(data).read_all()
            t.validate(full=True)
        except (pa.ArrowException, OSError) as e:
            raise DatasetError(f"{what}: cannot read the index ({type(e).__name__}: {e})") from None
        if t.num_rows != len(self):
            raise DatasetError(f"{what}: {t.num_rows} rows but the dataset has {len(self)}; rebuild the dataset")
        return {n: t.column(n).to_numpy() for n in t.column_names}

    def verify(self) -> dict:
        """Download every file of the dataset (through memory, not the cache) and check its checksum.

        Returns:
            ``{"ok": True, "files": n, "bytes": total}``.

        Raises:
            DatasetError: naming the first object that is missing, truncated or changed.
        """
        files = self.files()
        for meta in files:
            download(self.filesystem, join_key(self._root, meta["file"]), meta, self._url_of(meta["file"]),
                      self.timeout, None)
        return {"ok": True, "files": len(files), "bytes": sum(m["bytes"] for m in files)}

    def __repr__(self) -> str:
        return (f"RemoteArrowDataset({self.url!r}, rows={len(self)}, shards={self.num_shards}, "
                f"cache={str(self.cache.dir)!r}, cache_limit={self.cache.limit})")
