"""Recycled output buffers for the collators.

A padded batch is tens of MB written once per step; fresh allocations of that size come from ``mmap`` and pay a
page fault per page (the kernel zeroes every page first), which costs more than the copy itself. The pool hands
out arrays carved from buffers that earlier batches used. A buffer is lent while any array carved from it is
alive (the arrays, and the tensors ``torch.from_numpy`` made of them, hold a reference to it); the pool finds
the buffers that came back by their reference counts when it next allocates, so handing out an array costs no
finaliser (``weakref.finalize`` cost ~3 µs per array, three arrays per batch).

Memory: at most ``max_bytes`` (default 1 GiB) stay *idle* in the pool; beyond that the least recently used idle
buffers are freed (a loop that switches from padded to packed batches, or to smaller batches, gets its buffers
recycled again instead of finding the pool full of the old ones). Buffers still held by the training loop are the loop's memory, not the pool's: the pool tracks at most
``MAX_LENT`` of them (a loop that keeps every batch alive makes the older ones ordinary garbage-collected arrays).
"""

from __future__ import annotations

import math
import sys
import threading

import numpy as np

#: lent buffers tracked for reuse (older ones are left to the garbage collector)
MAX_LENT = 64
#: references to a lent buffer that nothing else holds: ``_lent`` list, the loop variable, getrefcount's argument
_UNUSED_REFS = 3


def group_layout(specs) -> tuple[list[tuple[int, int, tuple, np.dtype]], int]:
    """Byte offsets of arrays ``specs`` (``[(shape, dtype), ...]``) laid out in one buffer, each 64-byte aligned:
    ``([(offset, nbytes, shape, dtype), ...], total bytes)``."""
    out, at = [], 0
    for shape, dtype in specs:
        dt = dtype if type(dtype) is np.dtype else np.dtype(dtype)
        if type(shape) is int:
            shape, count = (shape,), shape
        else:
            shape = (int(shape),) if isinstance(shape, np.integer) else tuple(int(n) for n in shape)
            count = math.prod(shape)  # math.prod, not np.prod: np.prod costs ~5 µs a call
        nbytes = count * dt.itemsize
        out.append((at, nbytes, shape, dt))
        at += -(-nbytes // 64) * 64
    return out, at


class BufferPool:
    """Hands out arrays backed by reusable byte buffers; a buffer is reused once no array carved from it is alive.

    Args:
        max_bytes: the most bytes kept idle in the pool (the least recently used beyond it are freed).
    """

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self._free: list[np.ndarray] = []
        self._lent: list[np.ndarray] = []
        self._idle = 0
        self._lock = threading.Lock()
        #: buffers allocated so far (not recycled); their first writes pay page faults
        self.fresh = 0

    def _reclaim(self) -> None:
        """Move the lent buffers nothing references any more to the free list (lock held)."""
        still = []
        for b in self._lent:
            if sys.getrefcount(b) <= _UNUSED_REFS:
                if b.nbytes <= self.max_bytes:  # kept, newest last
                    self._free.append(b)
                    self._idle += b.nbytes
            else:
                still.append(b)
            del b
        self._lent = still[-MAX_LENT:]
        while self._idle > self.max_bytes:  # over the bound: the least recently used go (e.g. another layout's)
            self._idle -= self._free.pop(0).nbytes

    def _take(self, nbytes: int) -> np.ndarray:
        """A buffer of at least ``nbytes`` bytes, lent from now on: a free one of at most 4x the size, else new."""
        nbytes = max(nbytes, 1)
        buf = None
        with self._lock:
            self._reclaim()
            best = -1
            for i, b in enumerate(self._free):
                if b.nbytes >= nbytes and (best < 0 or b.nbytes < self._free[best].nbytes):
                    best = i
            if best >= 0 and self._free[best].nbytes <= 4 * nbytes:  # do not pin a huge buffer to a tiny batch
                buf = self._free.pop(best)
                self._idle -= buf.nbytes
            if buf is None:
                buf = np.empty(nbytes + nbytes // 4, dtype=np.uint8)  # headroom: the next batch is often a bit larger
                self.fresh += 1
            self._lent.append(buf)
        return buf

    def alloc(self, shape, dtype) -> np.ndarray:
        """One array of ``shape`` and ``dtype`` (uninitialised)."""
        return self.alloc_group([(shape, dtype)])[0]

    def alloc_group(self, specs) -> list[np.ndarray]:
        """Arrays for ``specs`` (``[(shape, dtype), ...]``), carved from one buffer (each 64-byte aligned): one
        batch's outputs cost one allocation, and their buffer is reused once all of them are gone."""
        layout, total = group_layout(specs)
        buf = self._take(total)
        return [buf[o : o + n].view(dt).reshape(shape) for o, n, shape, dt in layout]

    @property
    def idle_bytes(self) -> int:
        """Bytes of the buffers waiting for reuse (buffers that came back since the last allocation count once the
        pool next allocates or :meth:`collect` runs)."""
        return self._idle

    def collect(self) -> int:
        """Take back the buffers whose arrays are gone; returns the idle bytes."""
        with self._lock:
            self._reclaim()
        return self._idle

    def clear(self) -> None:
        """Free every idle buffer (lent ones stay with their arrays)."""
        with self._lock:
            self._reclaim()
            self._free.clear()
            self._idle = 0


#: the collators' pool in this process (DataLoader workers allocate in shared memory instead)
POOL = BufferPool()
