"""The shard cache of datasets on object storage: files in one directory within a byte bound, shared by the
processes of a node.

The bookkeeping is the directory itself (sizes, modification times as recency, ``flock`` pins), so DataLoader
workers and other processes that use the same directory share it with no server: a ``flock`` on
``cache_dir/.lock`` serialises the bookkeeping, a reader holds a shared ``flock`` on the file it reads, and room
is made by evicting the least recently used file that no reader holds. Part of ``datapipe.remote`` (see its
docstring for the whole design).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

from datapipe.format import DatasetError

__all__ = ["ShardCache"]

_FUTURE_NS = 10 * 365 * 86400 * 10**9  # "prefetched, not read yet": mtime this far past now
_LOCK_NAME = ".lock"
_PART = ".part"

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

    def _claim(self, path: Path) -> tuple[int | None, bool]:
        """``(fd, pinned)``: a descriptor of ``path`` holding its exclusive lock (nobody reads it: it may go), or
        ``(None, True)`` when a reader pins it, ``(None, False)`` when it is gone. Never waits."""
        try:
            fd = self._open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None, False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.release(fd)
            return None, True
        return fd, False

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
            fd, _ = self._claim(path)
            if fd is None:  # gone, or pinned by a reader
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
        """Remove a cached file (a damaged copy). One a reader still maps (pinned) is renamed aside instead: its
        bytes keep counting against the bound until the last reader lets go, then LRU evicts it first."""
        path = self.dir / name
        with self.locked():
            fd, pinned = self._claim(path)
            if fd is not None:
                os.unlink(path)
                self.release(fd)
            elif pinned:  # a new copy may take the name, the old inode stays counted
                aside = self.dir / f"{name}.{time.time_ns()}.damaged"
                os.replace(path, aside)
                os.utime(aside, ns=(0, 0))  # the oldest: evicted first once unpinned

    @staticmethod
    def unread(path: Path) -> bool:
        """True for a prefetched file no reader has used yet."""
        try:
            return path.stat().st_mtime_ns > time.time_ns() + _FUTURE_NS // 2
        except FileNotFoundError:
            return False
