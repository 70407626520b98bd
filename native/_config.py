"""Numba set-up shared by every kernel: one place for the flags.

Kernels are compiled with ``cache=True`` so a second process (a DataLoader worker, the next test run) loads
machine code from disk instead of recompiling. ``fastmath`` stays off: plans must be bitwise reproducible for a
seed, whatever the machine.

Numba keys a cached function by its own source file only, while a kernel's machine code also holds the kernels it
calls from other modules: after an edit (or an upgrade that keeps a file's size and time) to ``native/b.py``, a
kernel of ``native/a.py`` calling it would load stale code. So the cache lives in a directory named by a digest of
every ``native/*.py``: any change to the package compiles afresh. The root is ``$DATAPIPE_NUMBA_CACHE_DIR``, else
``$XDG_CACHE_HOME/datapipe/numba`` (``~/.cache/datapipe/numba``); the newest :data:`KEEP_CACHE_DIRS` digests are
kept. ``DATAPIPE_NUMBA_CACHE=0`` turns caching off.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path

import numba

#: Flags every ``@njit`` in ``native/`` uses.
NJIT_FLAGS: dict = {"cache": os.environ.get("DATAPIPE_NUMBA_CACHE", "1") != "0", "nogil": True}
#: cache directories (one per version of the package's sources) kept under the root
KEEP_CACHE_DIRS = 3


def source_digest() -> str:
    """A digest of the contents of every ``native/*.py`` (names included)."""
    h = hashlib.blake2b(digest_size=8)
    for p in sorted(Path(__file__).parent.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _cache_dir() -> str | None:
    root = os.environ.get("DATAPIPE_NUMBA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "datapipe", "numba")
    here = Path(root) / source_digest()
    try:
        here.mkdir(parents=True, exist_ok=True)
        os.utime(here)  # the newest: kept
        old = sorted((p for p in Path(root).iterdir() if p.is_dir() and p != here), key=lambda p: p.stat().st_mtime)
        for p in old[: max(0, len(old) - (KEEP_CACHE_DIRS - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    except OSError:  # not writable: numba falls back to __pycache__ (or compiles every time)
        return None
    return str(here)


CACHE_DIR = _cache_dir() if NJIT_FLAGS["cache"] else None


@contextlib.contextmanager
def _our_cache_dir():
    # numba picks a function's cache location when it is decorated, from numba.config.CACHE_DIR: ours only for ours
    saved = numba.config.CACHE_DIR
    if CACHE_DIR is not None:
        numba.config.CACHE_DIR = CACHE_DIR
    try:
        yield
    finally:
        numba.config.CACHE_DIR = saved


def njit(*args, **kwargs):
    """``numba.njit`` with the project's flags (cache, nogil); keyword arguments override them."""
    flags = {**NJIT_FLAGS, **kwargs}
    if args and callable(args[0]):
        with _our_cache_dir():
            return numba.njit(**flags)(args[0])
    decorate = numba.njit(*args, **flags)

    def apply(fn):
        with _our_cache_dir():
            return decorate(fn)

    return apply
