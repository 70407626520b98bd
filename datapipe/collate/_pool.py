"""Recycled output buffers for the collators.

A padded batch is tens of MB written once per step; fresh allocations of that size come from ``mmap`` and pay a
page fault per page (the kernel zeroes every page first), which costs more than the copy itself. The pool hands
out arrays carved from buffers that earlier batches used, and takes a buffer back when the last reference to its
array (the tensor the training loop held) is gone, so steady state touches no fresh memory.
"""

from __future__ import annotations

import math
import threading
import weakref

import numpy as np


class BufferPool:
    """Hands out arrays backed by reusable byte buffers; a buffer returns when its array is garbage.

    Args:
        max_bytes: the most bytes kept idle in the pool (buffers beyond it are freed).
    """

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self._free: list[np.ndarray] = []
        self._idle = 0
        self._lock = threading.Lock()
        #: buffers allocated so far (not recycled); their first writes pay page faults
        self.fresh = 0

    def alloc(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        if isinstance(shape, (int, np.integer)):
            count = int(shape)
        else:  # math.prod, not np.prod: this runs three times per batch and np.prod costs ~5 µs a call
            count = math.prod(int(n) for n in shape)
        nbytes = max(count * dtype.itemsize, 1)
        buf = None
        with self._lock:
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
        arr = buf[: count * dtype.itemsize].view(dtype).reshape(shape)
        weakref.finalize(arr, self._release, buf)
        return arr

    def _release(self, buf: np.ndarray) -> None:
        with self._lock:
            if self._idle + buf.nbytes <= self.max_bytes:
                self._free.append(buf)
                self._idle += buf.nbytes

    @property
    def idle_bytes(self) -> int:
        return self._idle


#: the collators' pool in this process (DataLoader workers allocate in shared memory instead)
POOL = BufferPool()
