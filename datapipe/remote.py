"""Datasets on object storage: URL resolution, a bounded on-disk shard cache, plan-ordered prefetch, retries.

``ArrowDataset.open("s3://bucket/ds", filesystem=..., cache_dir=..., cache_limit=...)`` returns a
:class:`RemoteArrowDataset`: the manifest and ``index.arrow`` (small) are read from the store into memory; payload
shards are downloaded on demand into ``cache_dir`` and memory-mapped from there.

* **Bound**: the files in ``cache_dir`` (partial downloads included: a download first reserves its full size as a
  sparse ``.part`` file) never add up to more than ``cache_limit`` bytes. Room is made by evicting the least
  recently used shard that no reader holds. The cache is shared by every process on the node that uses the same
  ``cache_dir`` (DataLoader workers included): a ``flock`` on ``cache_dir/.lock`` serialises the bookkeeping, and
  a reader holds a shared ``flock`` on the shard it reads, so an evictor never deletes a shard being read.
* **Streaming**: when no room can be made (the cache is smaller than one shard, or every cached shard is being
  read), the shard is read into memory instead, its rows taken, and the bytes dropped: the bound still holds when
  the cache is smaller than the shards one batch touches. A batch is gathered shard by shard (the needed rows of
  a shard are copied out, then the shard is released), so one batch never needs all its shards on disk at once.
* **Checksums** are checked on arrival against the manifest (the bytes are hashed as they are downloaded).
* **Retries**: transient errors (connection refused, timeouts, 5xx) are retried with exponential backoff until
  ``timeout`` seconds have passed, then a :class:`DatasetError` names the object and the store; a missing object
  fails at once. Every wait is bounded: a store that is down never hangs a reader.
* **Prefetch**: :meth:`RemoteArrowDataset.prefetch_plan` walks the batches the sampler will request on a
  background thread and downloads their shards ahead, in plan order, never more than ``cache_limit / 2`` bytes
  of not-yet-read shards ahead. A prefetched shard is marked "not read yet" (a modification time in the far
  future) so LRU eviction takes it last; the first read stamps it with the current time.
* **Pickling** (spawned DataLoader workers) carries the URL, the filesystem's configuration, the manifest and the
  cache settings, never an open handle.

``write_dataset`` and ``decompose`` accept a URL too: the files are built in a local temporary directory and
uploaded (manifest last, after the previous manifest was removed: readers never see a half-uploaded dataset as
data). See :func:`upload_dataset`.

Note for S3-compatible servers that do not accept the AWS SDK's streaming checksums on uploads (``rclone serve
s3`` answers HTTP 411): set ``AWS_REQUEST_CHECKSUM_CALCULATION=when_required`` before creating the filesystem.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from numpy.typing import NDArray

from datapipe.dataset import ArrowDataset, Batch, Ragged
from datapipe.format import MANIFEST, DatasetError, check_manifest, parse_json, schema_from_b64, verify_buffer

__all__ = ["RemoteArrowDataset", "ShardCache", "is_remote", "join_key", "local_path", "read_object", "remote_exists",
           "resolve", "upload_dataset", "with_retries", "write_remote"]

DEFAULT_TIMEOUT = 60.0
_BLOCK = 8 << 20
_FUTURE_NS = 10 * 365 * 86400 * 10**9  # "prefetched, not read yet": mtime this far past now
_LOCK_NAME = ".lock"
_PART = ".part"


# ---------------------------------------------------------------------------------------------------------------
# URLs
def _scheme(s: str) -> str | None:
    head, sep, _ = s.partition("://")
    return head.lower() if sep and head.replace("+", "").replace("-", "").isalnum() else None


def is_remote(url_or_path, filesystem: pafs.FileSystem | None = None) -> bool:
    """True when ``url_or_path`` must be read through a ``pyarrow.fs`` filesystem (a URL other than
    ``file://``, or any path with ``filesystem=``)."""
    if filesystem is not None:
        return True
    return isinstance(url_or_path, str) and _scheme(url_or_path) not in (None, "file")


def local_path(url_or_path) -> str | os.PathLike:
    """A ``file://`` URL as a local path; anything else unchanged."""
    if isinstance(url_or_path, str) and _scheme(url_or_path) == "file":
        return url_or_path.split("://", 1)[1]
    return url_or_path


def resolve(url_or_path, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it.

    Args:
        url_or_path: a URL any ``pyarrow.fs`` filesystem understands (``s3://bucket/ds``, ``gs://...``,
            ``hdfs://...``, ``file://...``), or a path inside ``filesystem``.
        filesystem: a configured ``pyarrow.fs.FileSystem``; the URL's scheme is then dropped and the rest is the
            path.

    Raises:
        TypeError: ``filesystem`` is not a ``pyarrow.fs.FileSystem``.
        DatasetError: the URL names no filesystem pyarrow knows.
    """
    s = os.fspath(url_or_path)
    if filesystem is not None:
        if not isinstance(filesystem, pafs.FileSystem):
            raise TypeError(f"filesystem must be a pyarrow.fs.FileSystem, e.g. pyarrow.fs.S3FileSystem(...) "
                            f"(got {type(filesystem).__name__})")
        path = s.split("://", 1)[1] if _scheme(s) else s
        return filesystem, path.rstrip("/")
    try:
        fs, path = pafs.FileSystem.from_uri(s)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError, OSError) as e:
        raise DatasetError(f"{s}: cannot resolve the URL ({e}); pass filesystem=pyarrow.fs.S3FileSystem(...) "
                           "(or another pyarrow.fs filesystem) configured for the store") from None
    return fs, path.rstrip("/")


def join_key(root: str, name: str) -> str:
    """``root/name`` inside a store (``name`` alone at the store's root)."""
    return f"{root}/{name}" if root else name


# ---------------------------------------------------------------------------------------------------------------
# retries and downloads
class _ChecksumMismatch(Exception):
    pass


def with_retries(fn: Callable, what: str, *, timeout: float, backoff: float = 0.05, max_backoff: float = 2.0,
                 retry_checksum: int = 1, min_attempts: int = 3):
    """Call ``fn()``; retry transient store errors with exponential backoff for up to ``timeout`` seconds, and at
    least ``min_attempts`` times (one stalled request that ends in an error after most of ``timeout``, such as a
    dropped connection, still gets its retries; the wait stays bounded by the filesystem's request timeout).

    Raises:
        DatasetError: the object does not exist (at once), its checksum differs twice, or the store kept failing
            for ``timeout`` seconds (naming ``what``, the attempts and the last error).
    """
    start = time.monotonic()
    delay, attempt = backoff, 0
    while True:
        attempt += 1
        try:
            return fn()
        except FileNotFoundError as e:
            raise DatasetError(f"{what}: not found in the store ({e}); check the URL, or rebuild/re-upload the "
                               "dataset") from None
        except _ChecksumMismatch as e:  # maybe a transfer error: download once more before giving up
            if retry_checksum <= 0:
                raise DatasetError(str(e)) from None
            retry_checksum -= 1
        except OSError as e:
            elapsed = time.monotonic() - start
            if attempt >= min_attempts and elapsed + delay > timeout:
                raise DatasetError(f"{what}: the store did not answer after {attempt} attempts over {elapsed:.1f} s "
                                   f"({e}); check that the endpoint is up and reachable and the credentials, or "
                                   f"raise timeout= (now {timeout} s)") from None
            time.sleep(delay)
            delay = min(delay * 2, max_backoff)


def read_object(fs: pafs.FileSystem, path: str, what: str, timeout: float) -> bytes:
    """The whole object at ``path`` in ``fs``, retried for ``timeout`` seconds (errors name ``what``)."""

    def go():
        with fs.open_input_stream(path) as f:
            return f.read()

    return with_retries(go, what, timeout=timeout)


def _download(fs: pafs.FileSystem, path: str, meta: dict, what: str, timeout: float, sink_path: Path | None):
    """Download one file of the manifest into ``sink_path`` (overwritten from 0) or memory (returned as a
    ``pyarrow.Buffer``), and check its size and checksum on arrival."""

    def go():
        got = 0
        chunks: list[bytes] = []
        out = open(sink_path, "r+b") if sink_path is not None else None
        try:
            with fs.open_input_stream(path) as f:
                while block := f.read(_BLOCK):
                    got += len(block)
                    if got > meta["bytes"]:
                        break
                    if out is not None:
                        out.write(block)
                    else:
                        chunks.append(block)
        finally:
            if out is not None:
                out.close()
        if got != meta["bytes"]:
            raise _ChecksumMismatch(f"{what}: {got if got <= meta['bytes'] else 'more than ' + str(meta['bytes'])} "
                                    f"bytes downloaded but the manifest says {meta['bytes']}; the object is "
                                    "truncated or was replaced: rebuild or re-upload the dataset")
        buf = pa.memory_map(str(sink_path), "r").read_buffer() if out is not None else pa.py_buffer(b"".join(chunks))
        try:
            verify_buffer(buf, meta["checksum"], what)
        except DatasetError as e:
            raise _ChecksumMismatch(str(e)) from None
        return None if out is not None else buf

    return with_retries(go, what, timeout=timeout)


# ---------------------------------------------------------------------------------------------------------------
# the cache
_CACHES: weakref.WeakSet = weakref.WeakSet()


def _after_fork() -> None:
    # A thread of the parent (the prefetcher) may hold the cache lock, a pin or a download at fork time: the
    # child's copies of those descriptors would keep the flocks held for as long as the child lives.
    for c in list(_CACHES):
        c._tlock = threading.Lock()
        for fd in list(c._fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        c._fds.clear()


os.register_at_fork(after_in_child=_after_fork)


class ShardCache:
    """Files in one directory, within ``limit`` bytes, shared by the processes of a node.

    The bookkeeping is the directory itself: sizes are ``st_size`` (a reservation is a ``.part`` file truncated
    to the full size), recency is ``st_mtime``, a reader's pin is a shared ``flock`` on the file.

    Args:
        cache_dir: the directory (created).
        limit: bytes, or ``None`` for no bound.
    """

    def __init__(self, cache_dir: str | os.PathLike, limit: int | None):
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.limit = limit
        self._tlock = threading.Lock()
        self._fds: set[int] = set()  # descriptors this process holds open (closed in a forked child)
        self.stats = {"hits": 0, "downloads": 0, "prefetched": 0, "streamed": 0, "evictions": 0,
                      "bytes_downloaded": 0, "peak_bytes": 0}
        _CACHES.add(self)

    def _open(self, path: Path, flags: int, mode: int = 0o644) -> int:
        fd = os.open(path, flags | os.O_CLOEXEC, mode)
        self._fds.add(fd)
        return fd

    def release(self, fd: int) -> None:
        """Close a descriptor from :meth:`acquire` (unpins the shard)."""
        self._fds.discard(fd)
        os.close(fd)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive over the threads of this process (a lock) and the processes of the node (a ``flock``)."""
        with self._tlock:
            fd = self._open(self.dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                self.release(fd)

    def entries(self) -> list[tuple[str, int, int]]:
        """``(name, bytes, mtime_ns)`` of every file in the cache directory."""
        out = []
        with os.scandir(self.dir) as it:
            for e in it:
                if e.name == _LOCK_NAME:
                    continue
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue
                out.append((e.name, st.st_size, st.st_mtime_ns))
        return out

    def used(self) -> int:
        """Bytes held by the cache directory (reservations count at their full size)."""
        return sum(size for _, size, _ in self.entries())

    def _make_room(self, size: int, *, spare_unread: bool) -> bool:
        """Under :meth:`locked`: evict least-recently-used unpinned shards until ``size`` more bytes fit."""
        if self.limit is None:
            return True
        if size > self.limit:
            return False
        entries = self.entries()
        used = sum(s for _, s, _ in entries)
        if used + size <= self.limit:
            return True
        now = time.time_ns()
        for name, fsize, mtime in sorted(entries, key=lambda e: e[2]):
            if name.endswith(_PART) or (spare_unread and mtime > now + _FUTURE_NS // 2):
                continue
            path = self.dir / name
            try:
                fd = self._open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # pinned by a reader
                self.release(fd)
                continue
            os.unlink(path)
            self.release(fd)
            self.stats["evictions"] += 1
            used -= fsize
            if used + size <= self.limit:
                return True
        return False

    def _part_alive(self, part: Path) -> bool:
        try:
            fd = self._open(part, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False  # nobody holds it: a download that died
        except BlockingIOError:
            return True
        finally:
            self.release(fd)

    def _note_peak(self) -> None:
        self.stats["peak_bytes"] = max(self.stats["peak_bytes"], self.used())

    def acquire(self, name: str, size: int, fetch: Callable[[Path], None], *, deadline: float, what: str,
                prefetch: bool = False) -> tuple[int | None, bool]:
        """Make ``name`` present and pin it.

        Returns:
            ``(fd, downloaded)``: ``fd`` an open descriptor holding a shared ``flock`` on the cached file (pass it
            to :meth:`release` to unpin), or ``None`` when the file cannot be held within the bound (the caller
            streams it from the store instead); ``downloaded`` whether this call fetched it. With
            ``prefetch=True`` nothing is pinned: ``fd`` is always ``None``.

        Raises:
            DatasetError: another process's download of the same shard did not finish before ``deadline``.
        """
        path, part = self.dir / name, self.dir / (name + _PART)
        while True:
            with self.locked():
                if path.exists():
                    if prefetch:
                        return None, False
                    fd = self._open(path, os.O_RDONLY)
                    fcntl.flock(fd, fcntl.LOCK_SH)  # evictors hold LOCK_EX only under the cache lock we hold
                    os.utime(path)  # recency for LRU; also marks a prefetched shard as read
                    self.stats["hits"] += 1
                    return fd, False
                state = "wait" if self._part_alive(part) else "reserve"
                if state == "reserve":
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(part)  # a stale reservation of a dead process
                    if not self._make_room(size, spare_unread=prefetch):
                        return None, False
                    fd = self._open(part, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    os.ftruncate(fd, size)  # the reservation: counted at full size from now on
                    self._note_peak()
            if state == "reserve":
                break
            if time.monotonic() > deadline:
                raise DatasetError(f"{what}: another reader's download into {part} did not finish in time; "
                                   "the store may be down (raise timeout=, or remove the stale file)")
            time.sleep(0.02)
        try:
            fetch(part)
        except BaseException:
            with self.locked():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(part)
            self.release(fd)
            raise
        with self.locked():
            os.replace(part, path)
            if prefetch:
                now = time.time_ns()
                os.utime(path, ns=(now, now + _FUTURE_NS))
            fcntl.flock(fd, fcntl.LOCK_SH)  # downgrade: from now on a pin, not a download
        self.stats["downloads"] += 1
        self.stats["bytes_downloaded"] += size
        if prefetch:
            self.stats["prefetched"] += 1
            self.release(fd)
            return None, True
        return fd, True

    def discard(self, name: str) -> None:
        """Remove a cached file (a damaged copy)."""
        with self.locked(), contextlib.suppress(FileNotFoundError):
            os.unlink(self.dir / name)

    @staticmethod
    def unread(path: Path) -> bool:
        """True for a prefetched file no reader has used yet."""
        try:
            return path.stat().st_mtime_ns > time.time_ns() + _FUTURE_NS // 2
        except FileNotFoundError:
            return False


# ---------------------------------------------------------------------------------------------------------------
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
        self._starts = np.zeros(len(shards) + 1, dtype=np.int64)
        np.cumsum([s["rows"] for s in shards], out=self._starts[1:])
        if self._starts[-1] != self.manifest["num_rows"]:
            raise DatasetError(f"{self._url_of(MANIFEST)}: shard rows sum to {self._starts[-1]} but num_rows is "
                               f"{self.manifest['num_rows']}")
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
            _download(self.filesystem, src, meta, what, self.timeout, part)

        fd, downloaded = self.cache.acquire(name, meta["bytes"], fetch, deadline=time.monotonic() + self.timeout,
                                            what=what)
        if fd is None:  # no room within the bound: through memory
            self.cache.stats["streamed"] += 1
            buf = _download(self.filesystem, src, meta, what, self.timeout, None)
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
            cname, meta["bytes"], lambda part: _download(self.filesystem, src, meta, what, self.timeout, part),
            deadline=time.monotonic() + self.timeout, what=what)
        if fd is None:  # no room within the bound: through memory (checked on arrival)
            self.cache.stats["streamed"] += 1
            return _download(self.filesystem, src, meta, what, self.timeout, None), None
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
                                           lambda part: _download(self.filesystem, src, meta, what, self.timeout,
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
        data = _download(self.filesystem, join_key(self._root, meta["file"]), meta, what, self.timeout, None)
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
            _download(self.filesystem, join_key(self._root, meta["file"]), meta, self._url_of(meta["file"]),
                      self.timeout, None)
        return {"ok": True, "files": len(files), "bytes": sum(m["bytes"] for m in files)}

    def __repr__(self) -> str:
        return (f"RemoteArrowDataset({self.url!r}, rows={len(self)}, shards={self.num_shards}, "
                f"cache={str(self.cache.dir)!r}, cache_limit={self.cache.limit})")


# ---------------------------------------------------------------------------------------------------------------
# uploads
def _upload_file(fs: pafs.FileSystem, local: Path, dest: str, what: str, timeout: float) -> None:
    def go():
        with open(local, "rb") as src, fs.open_output_stream(dest) as out:
            while block := src.read(_BLOCK):
                out.write(block)

    with_retries(go, what, timeout=timeout)


def _delete(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except OSError:
        # pyarrow's S3 filesystem re-creates the parent "directory" marker after a delete, which some
        # S3-compatible servers refuse: the object is gone all the same
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            raise


def remote_exists(url, filesystem: pafs.FileSystem | None = None, name: str = MANIFEST,
                  timeout: float = DEFAULT_TIMEOUT) -> bool:
    """True when ``url/name`` exists in the store."""
    fs, root = resolve(url, filesystem)
    info = with_retries(lambda: fs.get_file_info(join_key(root, name)), f"{os.fspath(url)}/{name}", timeout=timeout)
    return info.type == pafs.FileType.File


def upload_dataset(local_dir: str | os.PathLike, url, filesystem: pafs.FileSystem | None = None, *,
                   overwrite: bool = False, manifest: str = MANIFEST, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Upload a dataset directory built locally: every file, then the manifest last.

    An existing dataset at ``url`` is replaced only with ``overwrite``: its manifest is removed first (so readers
    see an unfinished upload, never a mix), and objects of the old dataset that the new one does not list are
    removed after the new manifest is in place.

    Args:
        local_dir: the local directory (``write_dataset`` output, or a subdirectory such as ``decomposition``).
        url: where it goes (``s3://bucket/ds``, or a path inside ``filesystem``).
        filesystem: a configured ``pyarrow.fs.FileSystem``.
        overwrite: replace an existing dataset.
        manifest: the file uploaded last.
        timeout: seconds of retries per object before a :class:`DatasetError`.

    Returns:
        ``url`` as a string.

    Raises:
        DatasetError: a dataset exists at ``url`` and ``overwrite`` is false; the store kept failing.
    """
    local_dir = Path(local_dir)
    fs, root = resolve(url, filesystem)
    url = os.fspath(url)
    if remote_exists(url, filesystem, manifest, timeout):
        if not overwrite:
            raise DatasetError(f"{url}: a dataset already exists (pass overwrite=True to replace it)")
        with_retries(lambda: _delete(fs, join_key(root, manifest)), f"{url}/{manifest}", timeout=timeout)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != manifest)
    if not (local_dir / manifest).exists():
        raise DatasetError(f"{local_dir}: no {manifest} to upload: the local build is unfinished")
    dirs = sorted({p.parent.relative_to(local_dir).as_posix() for p in files} - {"."})
    if fs.type_name not in ("s3", "gcs"):  # object stores have no directories (a marker could become a file)
        for d in [""] + dirs:
            with contextlib.suppress(OSError):  # the uploads below report a real error
                fs.create_dir(join_key(root, d) if d else root, recursive=True)
    for p in files:
        rel = p.relative_to(local_dir).as_posix()
        _upload_file(fs, p, join_key(root, rel), f"{url}/{rel}", timeout)
    _upload_file(fs, local_dir / manifest, join_key(root, manifest), f"{url}/{manifest}", timeout)
    keep = {p.relative_to(local_dir).as_posix() for p in files} | {manifest}
    sel = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    for info in with_retries(lambda: fs.get_file_info(sel), url, timeout=timeout):  # the old dataset's leftovers
        rel = info.path[len(root):].lstrip("/") if root else info.path
        if info.type == pafs.FileType.File and rel not in keep:
            with contextlib.suppress(OSError):
                _delete(fs, info.path)
    return url


def write_remote(write_local: Callable, source, url, *, filesystem: pafs.FileSystem | None = None,
                 overwrite: bool = False, **options) -> str:
    """``write_dataset`` to a URL: build in a local temporary directory, then :func:`upload_dataset`."""
    if remote_exists(url, filesystem) and not overwrite:
        raise DatasetError(f"{os.fspath(url)}: a dataset already exists (pass overwrite=True to replace it)")
    with tempfile.TemporaryDirectory(prefix="datapipe-upload-") as tmp:
        local = write_local(source, Path(tmp) / "ds", **options)
        return upload_dataset(local, url, filesystem, overwrite=overwrite)

