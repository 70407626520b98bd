"""Prefetch in the main process: batches built by a small thread pool, pinned into recycled buffers, copied to the
device one step ahead.

* :class:`ThreadPrefetcher` runs ``fetch(item)`` (e.g. ``collate(dataset.__getitems__(rows))``) for the next
  items of a source on a few threads and yields the results in source order. It pays off when ``fetch`` spends
  its time outside the GIL: datapipe's gathers and collators are Numba kernels compiled with ``nogil=True``, so
  the next batches are built while the training step runs, with no worker processes and no shared-memory
  transfer. Heavy Python transforms still want worker processes.
* :func:`pin` copies a batch's tensors into page-locked buffers taken from a small pool keyed by (shape, dtype);
  a buffer goes back to the pool when the last tensor using it is garbage. A no-op when CUDA is unavailable.
* :class:`DevicePrefetcher` copies each batch to the device one step ahead, on a side CUDA stream (the caller's
  stream waits for it and the tensors are recorded on the caller's stream, so the allocator never reuses their
  memory early); on a CPU device it is a plain ``.to(device)``.

The items a prefetcher pulled from its source but did not deliver are lost on ``close()``: a loader that resumes
counts batches *delivered*, so it neither repeats nor skips a batch.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.utils.data

__all__ = ["DevicePrefetcher", "PinnedPool", "ThreadPrefetcher", "in_prefetch_thread", "may_parallelize", "pin"]

_LOCAL = threading.local()


def in_prefetch_thread() -> bool:
    """True inside a :class:`ThreadPrefetcher` thread: kernels there run serially (the threads are the
    parallelism; a Numba parallel region per thread would oversubscribe the cores)."""
    return getattr(_LOCAL, "prefetch", False)


def may_parallelize() -> bool:
    """Whether a kernel may split its work over Numba's threads here: not inside a DataLoader worker (workers
    already run in parallel) nor a prefetch thread."""
    return torch.utils.data.get_worker_info() is None and not in_prefetch_thread()


def _mark_thread() -> None:
    _LOCAL.prefetch = True


_DONE = object()


class ThreadPrefetcher:
    """Runs fetch(item) for items of `source` on `num_threads` threads, `depth` items ahead, yields results in
    source order. An exception raised by fetch(item) is re-raised by the __next__ that reaches that item; the
    next __next__ continues with the following item. close() stops the threads and drops pending work.

    The source is advanced in the caller's thread (a sampler need not be thread-safe), one item per submitted
    fetch. An exception raised by the source itself is re-raised in order, after the items before it, and ends
    the iteration.

    Args:
        fetch: called as ``fetch(item)`` on a pool thread.
        source: the items, in the order their results are yielded.
        depth: items submitted ahead of the one being delivered (>= 1).
        num_threads: pool threads (>= 1).

    Example::

        with ThreadPrefetcher(lambda rows: collate(ds.__getitems__(rows)), sampler, depth=2) as batches:
            for batch in batches:
                step(batch)
    """

    def __init__(self, fetch: Callable[[Any], Any], source: Iterable[Any], *, depth: int = 2,
                 num_threads: int = 2) -> None:
        if not callable(fetch):
            raise TypeError(f"fetch must be callable (got {type(fetch).__name__})")
        if not isinstance(depth, (int, np.integer)) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"depth must be an integer >= 1 (got {depth=})")
        if not isinstance(num_threads, (int, np.integer)) or isinstance(num_threads, bool) or num_threads < 1:
            raise ValueError(f"num_threads must be an integer >= 1 (got {num_threads=})")
        self.fetch, self.depth, self.num_threads = fetch, int(depth), int(num_threads)
        self._source: Iterator | None = iter(source)
        self._pending: deque[Future] = deque()
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
            self.num_threads, thread_name_prefix="datapipe-prefetch", initializer=_mark_thread)
        self._closed = False

    def _top_up(self) -> None:
        while self._source is not None and len(self._pending) < self.depth:
            try:
                item = next(self._source)
            except StopIteration:
                self._source = None
                return
            except Exception as e:  # noqa: BLE001  re-raised in order by __next__ (KeyboardInterrupt: at once)
                self._source = None
                failed: Future = Future()
                failed.set_exception(e)
                self._pending.append(failed)
                return
            self._pending.append(self._pool.submit(self.fetch, item))

    def __iter__(self) -> ThreadPrefetcher:
        return self

    def __next__(self):
        if self._closed:
            raise StopIteration
        self._top_up()
        if not self._pending:
            self.close()
            raise StopIteration
        fut = self._pending.popleft()
        self._top_up()  # keep `depth` fetches running while the caller works on this one
        return fut.result()

    def close(self) -> None:
        """Stop the threads; fetches not started are dropped, running ones finish and are discarded."""
        if self._closed:
            return
        self._closed = True
        for fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._source = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ThreadPrefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:  # no waiting here: the last reference may be dropped on one of the pool's own threads
            self._closed = True
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
        except Exception:  # noqa: BLE001  interpreter shutdown
            pass


# ---- pinned batches ----------------------------------------------------------------------------------------
def _pinned_bytes(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class PinnedPool:
    """Page-locked buffers recycled by (shape, dtype): a buffer returns to the pool when the last tensor that
    uses its memory (the pinned copy and every view of it) is garbage.

    Args:
        max_bytes: the most bytes kept idle (buffers beyond it are freed).
        allocate: ``allocate(nbytes) -> uint8 tensor``; default page-locked host memory (needs CUDA).
    """

    def __init__(self, max_bytes: int = 1 << 30, *, allocate: Callable[[int], torch.Tensor] = _pinned_bytes):
        self.max_bytes, self.allocate = int(max_bytes), allocate
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._idle = 0
        self._lock = threading.Lock()

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``shape`` and ``dtype`` in a recycled (or new) buffer; its content is undefined."""
        shape = tuple(int(s) for s in shape)
        key = (shape, dtype)
        with self._lock:
            free = self._free.get(key)
            buf = free.pop() if free else None
            if buf is not None:
                self._idle -= buf.numel()
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        if buf is None:
            buf = self.allocate(max(nbytes, 1))
        # the tensor handed out wraps a numpy view of the buffer: torch keeps that view alive for as long as any
        # tensor shares its storage (slices included), so the finalizer fires only when all of them are gone
        view = buf.numpy()[:nbytes]
        weakref.finalize(view, self._release, key, buf)
        out = torch.from_numpy(view)
        return out.view(dtype).view(shape) if nbytes else torch.empty(shape, dtype=dtype)

    def _release(self, key: tuple, buf: torch.Tensor) -> None:
        with self._lock:
            if self._idle + buf.numel() <= self.max_bytes:
                self._free.setdefault(key, []).append(buf)
                self._idle += buf.numel()

    @property
    def idle_bytes(self) -> int:
        return self._idle


_POOL: PinnedPool | None = None


def _map(batch, fn):
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        out = {k: _map(v, fn) for k, v in batch.items()}
        if type(batch) is not dict:
            try:
                new = copy.copy(batch)  # keeps the class and attributes of a dict subclass (e.g. a Batch)
                new.update(out)
                return new
            except Exception:  # noqa: BLE001
                return out
        return out
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_map(v, fn) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map(v, fn) for v in batch)
    return batch


def pin(batch, pool: PinnedPool | None = None):
    """Copy the tensors of ``batch`` (a tensor, or a dict/list/tuple nesting them) into page-locked buffers.

    Args:
        batch: the batch; non-tensor leaves are passed through.
        pool: where the buffers come from; default a process-wide :class:`PinnedPool`.

    Returns:
        the batch with every CPU tensor replaced by a pinned copy of the same shape and dtype. Without CUDA
        (and no ``pool`` given) the batch itself, unchanged: there is no page-locked memory to pin into.

    A buffer returns to the pool as soon as its tensors are garbage, so keep a pinned batch alive until an
    asynchronous (``non_blocking``) copy from it has finished; :class:`DevicePrefetcher` does.
    """
    global _POOL
    if pool is None:
        if not torch.cuda.is_available():
            return batch
        if _POOL is None:
            _POOL = PinnedPool()
        pool = _POOL

    def one(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "cpu" or t.layout != torch.strided:
            return t
        out = pool.empty(t.shape, t.dtype)
        out.copy_(t)
        return out

    return _map(batch, one)


# ---- device prefetch ---------------------------------------------------------------------------------------
class DevicePrefetcher:
    """Wraps an iterator of batches; copies each batch to ``device`` one step ahead.

    On a CUDA device the copy runs on a side stream while the caller works on the previous batch; before a
    batch is handed over, the caller's current stream waits for the side stream and each tensor is recorded on
    it (``record_stream``), so its memory is not reused while the caller's kernels still read it. Copies are
    asynchronous only from pinned memory (see :func:`pin`); the host batch is kept until its copy has finished
    (a CUDA event, checked one step later), so recycled pinned buffers are never overwritten mid-copy. On a CPU
    device, a plain ``.to(device)``.

    Args:
        source: an iterator (or iterable) of batches (tensors nested in dicts/lists/tuples).
        device: the target device.
        non_blocking: asynchronous host-to-device copies.
    """

    def __init__(self, source: Iterator, device: str | torch.device, *, non_blocking: bool = True):
        self.device = torch.device(device)
        self.non_blocking = bool(non_blocking)
        self._iterable = source
        self._source = iter(source)
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(device=self.device) if self._cuda else None
        self._next: Any = _DONE
        self._host: tuple | None = None
        self._error: BaseException | None = None
        self._started = False

    def _copy(self, batch):
        return _map(batch, lambda t: t.to(self.device, non_blocking=self.non_blocking))

    def _preload(self) -> None:
        if self._host is not None:  # issued a step ago: normally finished, so this wait costs nothing
            self._host[1].synchronize()
            self._host = None
        try:
            batch = next(self._source)
        except StopIteration:
            self._next = _DONE
            return
        except Exception as e:  # noqa: BLE001  re-raised when the caller reaches it
            self._next, self._error = _DONE, e
            return
        if self._cuda:
            with torch.cuda.stream(self._stream):
                self._next = self._copy(batch)
                done = torch.cuda.Event()
                done.record(self._stream)
            # the host batch (perhaps in recycled pinned buffers, see pin) must outlive its asynchronous copy
            self._host = (batch, done)
        else:
            self._next = self._copy(batch)

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self):
        if not self._started:
            self._started = True
            self._preload()
        batch = self._next
        if batch is _DONE:
            if self._error is not None:
                e, self._error = self._error, None
                raise e
            raise StopIteration
        if self._cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._stream)
            _map(batch, lambda t: t.record_stream(current) if t.device.type == "cuda" else None)
        self._preload()
        return batch

    def __len__(self) -> int:
        return len(self._iterable)  # type: ignore[arg-type]
