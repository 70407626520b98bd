"""``RemoteArrowDataset``: an ``ArrowDataset`` whose directory is on object storage, read through a bounded
local shard cache, gathered shard by shard, with plan-ordered prefetch on a background thread.

``ArrowDataset.open(url, ...)`` returns one (through the opener ``datapipe/__init__.py`` registers in
``datapipe.urls``). Part of ``datapipe.remote`` (see its docstring for the whole design).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from numpy.typing import NDArray

from datapipe.dataset import ArrowDataset, Batch, Ragged
from datapipe.format import (MANIFEST, DatasetError, check_manifest, parse_json, schema_from_b64,
                             shard_starts, verify_buffer)
from datapipe.remote_cache import ShardCache
from datapipe.remote_io import DEFAULT_TIMEOUT, download, read_object
from datapipe.urls import join_key, resolve

__all__ = ["RemoteArrowDataset"]


def _columns(rb: pa.RecordBatch) -> dict:
    """Arrow columns as the :class:`Batch` of ``ArrowDataset.__getitems__``: Ragged / numpy / lists."""
    cols: dict = {}
    for name, col in zip(rb.schema.names, rb.columns):
        t = col.type
        if (pa.types.is_list(t) or pa.types.is_large_list(t)) and col.null_count == 0 and (
                pa.types.is_integer(t.value_type) or pa.types.is_floating(t.value_type)) \
                and col.values.null_count == 0:
            off = col.offsets.to_numpy().astype(np.int64)
            values = col.values.to_numpy()[off[0]:off[-1]]
            cols[name] = Ragged(values, off - off[0])
        elif (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)) and col.null_count == 0:
            cols[name] = col.to_numpy(zero_copy_only=False)
        else:
            cols[name] = col.to_pylist()
    return cols


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

    Attributes:
        url: the dataset's URL (``path`` holds it too, as a string).
        filesystem: the ``pyarrow.fs`` filesystem.
        cache: the :class:`ShardCache`.
    """

    is_remote = True

    def __init__(self, url, *, filesystem: pafs.FileSystem | None = None, cache_dir: str | os.PathLike | None = None,
                 cache_limit: float | None = None, timeout: float = DEFAULT_TIMEOUT, _manifest: dict | None = None):
        if cache_limit is not None and (not isinstance(cache_limit, (int, float, np.integer, np.floating))
                                        or not cache_limit >= 0):
            raise ValueError(f"cache_limit must be a number of bytes >= 0, or None for no bound (got {cache_limit=})")
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a number of seconds > 0 (got {timeout=})")
        self.url = os.fspath(url)
        self.filesystem, self._root = resolve(self.url, filesystem)
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
                "manifest": self.manifest}

    def __setstate__(self, state):
        self.__init__(state["url"], filesystem=state["filesystem"], cache_dir=state["cache_dir"],
                      cache_limit=state["cache_limit"], timeout=state["timeout"], _manifest=state["manifest"])

    # ---- shards -------------------------------------------------------------------------------------------
    def _cache_name(self, s: int) -> str:
        meta = self.manifest["shards"][s]
        digest = meta["checksum"].split(":", 1)[-1][:16]
        return f"{meta['file'].replace('/', '__').removesuffix('.arrow')}-{digest}.arrow"

    def _take(self, s: int, rows: NDArray[np.int64], *, again: bool = False) -> pa.RecordBatch:
        """Rows ``rows`` of shard ``s``, copied out; the shard is pinned only meanwhile. A cached copy that fails
        its check (damaged on the local disk) is removed and downloaded again, once."""
        meta = self.manifest["shards"][s]
        what = self._url_of(meta["file"])
        src = join_key(self._root, meta["file"])
        name = self._cache_name(s)

        def fetch(part: Path) -> None:
            download(self.filesystem, src, meta, what, self.timeout, part)

        fd, downloaded = self.cache.acquire(name, meta["bytes"], fetch, deadline=time.monotonic() + self.timeout,
                                            what=what)
        if fd is None:  # no room within the bound: through memory
            self.cache.stats["streamed"] += 1
            buf = download(self.filesystem, src, meta, what, self.timeout, None)
            return self._take_from(buf, rows, meta, what, validate=True)
        try:
            out = self._from_cache(fd, name, rows, meta, what, check=not downloaded, strict=again)
        finally:
            self.cache.release(fd)  # unpin: the mapping is closed and the taken rows are copies
        if out is None:  # the cached copy was damaged on the local disk: drop it, download again
            self.cache.discard(name)
            return self._take(s, rows, again=True)
        return out

    def _from_cache(self, fd: int, name: str, rows, meta, what, *, check: bool, strict: bool):
        path = self.cache.dir / name
        with pa.memory_map(str(path), "r") as mm:
            buf = mm.read_buffer()
            key = (name, os.fstat(fd).st_ino)
            first = key not in self._checked
            if first and check:  # cached by another reader: checked once per process, as local files are
                try:
                    verify_buffer(buf, meta["checksum"], f"{path} (the cached copy of {what})")
                except DatasetError:
                    if strict:
                        raise
                    return None
            out = self._take_from(buf, rows, meta, what, validate=first)
            self._checked.add(key)
            del buf
            return out

    def _take_from(self, buf: pa.Buffer, rows, meta, what, *, validate: bool) -> pa.RecordBatch:
        try:
            reader = pa.ipc.open_file(buf)
            batch = reader.get_batch(0) if reader.num_record_batches == 1 else \
                reader.read_all().combine_chunks().to_batches()[0]
            if validate:  # before any take reads through the offsets
                batch.validate(full=True)
        except (pa.ArrowException, OSError, IndexError) as e:
            raise DatasetError(f"{what}: cannot read the shard ({type(e).__name__}: {e}); the object is truncated "
                               "or corrupt: rebuild or re-upload the dataset") from None
        if batch.num_rows != meta["rows"]:
            raise DatasetError(f"{what}: {batch.num_rows} rows but the manifest says {meta['rows']}")
        if not batch.schema.equals(self.schema):
            raise DatasetError(f"{what}: schema {batch.schema} differs from the manifest's {self.schema}")
        return batch.take(pa.array(rows, type=pa.int64()))

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
        raise NotImplementedError("remote shards are read through the cache (__getitems__), not kept open")

    # ---- rows ---------------------------------------------------------------------------------------------
    def __getitem__(self, i: int) -> dict:
        if isinstance(i, slice):
            return self.__getitems__(np.arange(len(self))[i])
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an int (got {type(i).__name__}); use __getitems__ for batches")
        return self.__getitems__(np.array([i], dtype=np.int64)).rows()[0]

    def __getitems__(self, indices) -> Batch:
        """Gather a batch of rows shard by shard (each shard pinned in the cache only while its rows are copied).

        Args:
            indices: int array-like ``[B]`` (negative indices count from the end).

        Returns:
            :class:`Batch` as ``ArrowDataset.__getitems__`` returns it.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        B = len(idx)
        if B == 0:
            return Batch({n: [] for n in self.schema.names}, 0, idx)
        shard, local = self._locate(idx)
        order = np.argsort(shard, kind="stable")
        ss = shard[order]
        bounds = np.flatnonzero(np.diff(ss)) + 1
        groups = [(int(ss[a]), order[a:b]) for a, b in zip(np.r_[0, bounds], np.r_[bounds, B])]
        # cached shards first: with a cache smaller than the batch's shards, LRU would otherwise evict each shard
        # just before this batch's scan reaches it (every read a miss); this way the cached ones are hits
        groups.sort(key=lambda g: not (self.cache.dir / self._cache_name(g[0])).exists())
        parts = [self._take(s, local[pos]) for s, pos in groups]
        inverse = np.empty(B, dtype=np.int64)
        inverse[np.concatenate([pos for _, pos in groups])] = np.arange(B)
        table = pa.Table.from_batches(parts, schema=self.schema).take(pa.array(inverse)).combine_chunks()
        rb = table.to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], schema=self.schema)
        return Batch(_columns(rb), B, idx)

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
        t = threading.Thread(target=self._prefetch_loop, args=(batches, stop), daemon=True,
                             name="datapipe-remote-prefetch")
        self._prefetch = (t, stop)
        t.start()

    def stop_prefetch(self) -> None:
        """Stop the prefetch thread (a download in flight finishes first)."""
        if self._prefetch is not None:
            t, stop = self._prefetch
            stop.set()
            t.join(timeout=self.timeout + 5)
            self._prefetch = None

    def _prefetch_loop(self, batches: Iterable, stop: threading.Event) -> None:
        limit = self.cache.limit
        budget = None if limit is None else limit // 2
        ahead: deque[tuple[Path, int]] = deque()  # prefetched, maybe not read yet
        ahead_bytes = 0
        try:
            for rows in batches:
                rows = np.asarray(rows, dtype=np.int64).reshape(-1)
                if not len(rows):
                    continue
                shards, first = np.unique(self._locate(rows)[0], return_index=True)
                for s in shards[np.argsort(first)].tolist():
                    meta = self.manifest["shards"][s]
                    size = meta["bytes"]
                    if budget is not None and size > budget:
                        continue
                    path = self.cache.dir / self._cache_name(s)
                    while True:
                        if stop.is_set():
                            return
                        while ahead and not ShardCache.unread(ahead[0][0]):  # read or evicted since
                            ahead_bytes -= ahead.popleft()[1]
                        if budget is None or ahead_bytes + size <= budget:
                            break
                        stop.wait(0.01)
                    if path.exists():
                        continue
                    what = self._url_of(meta["file"])
                    src = join_key(self._root, meta["file"])
                    while not stop.is_set():
                        before = self.cache.stats["prefetched"]
                        self.cache.acquire(self._cache_name(s), size,
                                           lambda part: download(self.filesystem, src, meta, what, self.timeout,
                                                                  part),
                                           deadline=time.monotonic() + self.timeout, what=what, prefetch=True)
                        if self.cache.stats["prefetched"] > before:
                            ahead.append((path, size))
                            ahead_bytes += size
                            break
                        if path.exists():
                            break
                        stop.wait(0.01)  # no room without evicting unread shards: wait for reads
        except Exception as e:  # noqa: BLE001  the reads retry and raise with context
            self.cache.stats["prefetch_error"] = str(e)

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
