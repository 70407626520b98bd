"""Counting passes and metadata scans kept across samplers and processes.

A windowed plan over 1e9 rows needs one counting pass per epoch (tens of seconds on 2 cores) before its first
batch. A resume runs in a *fresh* process (the job was restarted), which would pay that pass again before it can
load its state. :class:`PlanCache` keeps a pass's tables in this process (the last ``keep``) and, when the
metadata is a memory-mapped file, on disk under :func:`cache_dir`, keyed by the file's identity (real path, inode,
size, modification and change times, offset) and the sampler's digest, options, seed and epoch: a restarted rank reads a few MB
instead of the corpus. Samplers check what they read back against the batches they compute (a window's batch
sizes must match the table's), so an entry that does not match (a damaged cache file) is an error naming it,
never a wrong plan.

The directory is ``$DATAPIPE_PLAN_CACHE`` (``0``/``off``/empty: no disk cache), else
``$XDG_CACHE_HOME/datapipe/plans`` (``~/.cache/datapipe/plans``); it keeps the newest :data:`MAX_FILES` entries.
Writes are atomic (a temporary file renamed into place), so ranks sharing the directory never read half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import numpy as np
from numpy.typing import NDArray

__all__ = ["KEEP_BIG_FILES", "MAX_FILES", "VERIFY_ENTRIES", "PlanCache", "StalePlanCache", "cache_dir", "check_window", "file_identity", "lock_path",
           "locked", "prune_files", "source_id", "spot_positions", "write_mapped"]

#: entries kept on disk (the oldest are removed when a new one is written)
MAX_FILES = 32


class StalePlanCache(RuntimeError):
    """A cached counting pass disagrees with the batches computed from the metadata (a damaged cache entry)."""


def cache_dir() -> Path | None:
    """Where counting passes are kept on disk, or None when disabled (``DATAPIPE_PLAN_CACHE=0``)."""
    env = os.environ.get("DATAPIPE_PLAN_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "0", "off", "false", "no") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "datapipe" / "plans"


def file_identity(arr) -> tuple | None:
    """``(real path, inode, size, mtime_ns, ctime_ns, offset)`` of the file a memory-mapped array reads, or None (an
    array in memory has no identity that outlives the process). Any write to the file changes its ``ctime``, which
    no tool can set back."""
    a, seen = arr, 0
    while a is not None and seen < 8:
        name = getattr(a, "filename", None)
        if name:
            try:
                st = os.stat(name)
            except OSError:
                return None
            return (os.path.realpath(name), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                    int(getattr(a, "offset", 0)))
        a, seen = getattr(a, "base", None), seen + 1
    return None


def source_id(arr) -> tuple:
    """What identifies metadata for the caches: its file (:func:`file_identity`), else the address and length of
    its buffer in this process (the same array object, or a view of the same memory)."""
    ident = file_identity(arr)
    if ident is not None:
        return ident
    a = np.asarray(arr)
    return ("memory", int(a.__array_interface__["data"][0]), a.shape, a.dtype.str)


def _encode(value: dict) -> tuple[dict, dict]:
    arrays, meta = {}, {}
    for k, v in value.items():
        if isinstance(v, np.ndarray):
            arrays[k] = v
        else:
            meta[k] = v
    return arrays, meta


class PlanCache:
    """Tables of one kind (e.g. a sampler's counting passes): the last ``keep`` in memory, and on disk when the
    metadata is a file.

    Args:
        kind: a name for the entries (part of the disk key).
        keep: entries kept in this process.
    """

    def __init__(self, kind: str, keep: int = 2):
        self.kind, self.keep = kind, int(keep)
        self._mem: OrderedDict = OrderedDict()

    def _path(self, key, identity) -> Path | None:
        root = cache_dir()
        if root is None or identity is None:
            return None
        h = hashlib.sha256(repr((self.kind, identity, key)).encode()).hexdigest()[:40]
        return root / f"{self.kind}-{h}.npz"

    def get(self, key, source=None) -> dict | None:
        """The tables stored under ``key`` for metadata ``source`` (a disk entry only when ``source`` is a
        memory-mapped file); None when absent. A value read from disk has ``from_disk=True`` and the path under
        ``cache_file``."""
        if key in self._mem:
            self._mem.move_to_end(key)
            return self._mem[key]
        identity = file_identity(source) if source is not None else None
        path = self._path(key, identity)
        if path is None or not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["__meta__"]))
                if meta.pop("__key__", None) != repr((identity, key)):
                    return None
                value = {k: z[k] for k in z.files if k != "__meta__"}
        except (OSError, ValueError, KeyError):  # unreadable or truncated by a crash: computed again
            return None
        value.update(meta, from_disk=True, cache_file=str(path))
        self._remember(key, value)
        return value

    def put(self, key, value: dict, source=None) -> dict:
        """Store ``value`` (numpy arrays and JSON-able values) under ``key``; returns it."""
        self._remember(key, value)
        path = self._path(key, file_identity(source) if source is not None else None)
        if path is None:
            return value
        arrays, meta = _encode({k: v for k, v in value.items() if k not in ("from_disk", "cache_file")})
        meta["__key__"] = repr((file_identity(source), key))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".part-", suffix=".npz", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, __meta__=np.array(json.dumps(meta)), **arrays)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            self._prune(path.parent)
        except OSError:  # a read-only or full disk costs the next process a counting pass, nothing else
            pass
        return value

    def memo(self, key, source, compute: Callable[[], dict]) -> dict:
        """``get(key, source)``, else ``put(key, compute(), source)``."""
        value = self.get(key, source)
        return value if value is not None else self.put(key, compute(), source)

    def forget(self, key, source=None) -> None:
        """Drop an entry from memory and disk (after it proved stale)."""
        self._mem.pop(key, None)
        path = self._path(key, file_identity(source) if source is not None else None)
        if path is not None:
            try:
                path.unlink()
            except OSError:
                pass

    def _remember(self, key, value: dict) -> None:
        self._mem[key] = value
        self._mem.move_to_end(key)
        while len(self._mem) > self.keep:
            self._mem.popitem(last=False)

    @staticmethod
    def _prune(root: Path) -> None:
        files = sorted(root.glob("*.npz"), key=lambda p: p.stat().st_mtime_ns if p.exists() else 0)
        for p in files[:-MAX_FILES]:
            try:
                p.unlink()
            except OSError:
                pass


def check_window(tables: dict, w: int, sizes: np.ndarray, by_window: np.ndarray, wcum: np.ndarray,
                 on_stale: Callable[[], Any]) -> None:
    """Raise :class:`StalePlanCache` when window ``w``'s computed batch ``sizes`` differ from the cached table
    (``by_window[wcum[w]:wcum[w+1]]``); ``on_stale()`` runs first (e.g. forgets the entry). Tables computed in this
    process are not checked (they came from the same kernels)."""
    if not tables.get("from_disk"):
        return
    want = by_window[int(wcum[w]) : int(wcum[w + 1])]
    if len(want) != len(sizes) or not np.array_equal(want, sizes):
        on_stale()
        raise StalePlanCache(
            f"the counting pass cached in {tables.get('cache_file')} does not match window {w} of the metadata "
            "(a damaged cache entry); the entry was removed: build the sampler again (or set DATAPIPE_PLAN_CACHE=0)")


# ---- big cached files (rows sorted by a key, group ids): written once per node, shared by its ranks -------------
#: big files of one kind kept in the cache directory (the newest): a node running two samplers over other metadata
#: sorts again only for a third
KEEP_BIG_FILES = 2
#: entries of a big cached file checked against the metadata when it is opened (evenly spread)
VERIFY_ENTRIES = 4096


def spot_positions(n: int) -> NDArray[np.int64]:
    """int64 positions in ``[0, n)`` at which an opened cached file of ``n`` entries is checked (``VERIFY_ENTRIES``
    evenly spread, first and last included): a damaged or foreign file is refused, never read as a plan."""
    return np.unique(np.linspace(0, n - 1, min(n, VERIFY_ENTRIES)).astype(np.int64))


def lock_path(final: Path) -> Path:
    """The lock file of the cached file ``final`` (beside it, hidden)."""
    return final.with_name(f".{final.stem}.lock")


@contextlib.contextmanager
def locked(path: Path | None) -> Iterator[None]:
    """An exclusive lock on ``path`` (None: no lock): the ranks of a node sharing a directory build a file once; the
    others wait, then read what it wrote."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def write_mapped(final: Path, dtype, n: int, fill: Callable[[np.memmap], None]) -> bool:
    """Write ``final`` as ``n`` values of ``dtype`` that ``fill(map)`` writes into a memory map, atomically (a reader
    never sees half a file), unless a file of that size is already there; the caller holds :func:`locked`.

    Returns:
        whether the file was written.
    """
    dtype = np.dtype(dtype)
    if final.exists() and final.stat().st_size == n * dtype.itemsize:
        return False
    fd, tmp = tempfile.mkstemp(prefix=f".part-{final.stem}-", dir=final.parent)
    try:
        os.ftruncate(fd, n * dtype.itemsize)
        out = np.memmap(tmp, dtype=dtype, mode="r+", shape=(n,))
        fill(out)
        out.flush()
        del out
        os.replace(tmp, final)
    finally:
        os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True


def prune_files(root: Path, pattern: str, keep: Path, count: int,
                companions: Callable[[Path], list[Path]] = lambda p: [lock_path(p)]) -> None:
    """Remove all but the newest ``count`` files of ``root`` matching ``pattern`` (``keep`` always stays), each with
    its ``companions`` (its lock file)."""
    files = sorted((p for p in root.glob(pattern) if p != keep), key=lambda p: p.stat().st_mtime_ns if p.exists() else 0)
    for p in files[: max(0, len(files) - (count - 1))]:
        for f in (p, *companions(p)):
            with contextlib.suppress(OSError):
                f.unlink()
