"""The iterators behind ``datapipe.DataLoader``: torch's own iterator classes, subclassed to count each batch
delivered (or raised) at its position in the epoch, plus the index source they read and the generators of a pass.

Everything here holds the loader weakly: as with torch, ``del loader`` (or its iterator) frees worker processes at
once, without waiting for the cycle collector; an iterator whose loader is gone behaves as torch's.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.utils.data as tud
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter, _SingleProcessDataLoaderIter

from datapipe.orders import SeededRandomSampler, epoch_order

if TYPE_CHECKING:
    from datapipe.loader import DataLoader

__all__ = ["DeviceIter", "IndexSource", "MultiProcessIter", "SingleProcessIter", "TrackedIter", "ordered_items",
           "pinned", "replayed_items", "skipping"]


class IndexSource:
    """What torch's iterator reads as the index sampler: the loader's pass, from its position, skipping batches
    delivered ahead. Every ``iter()`` (also a persistent-worker reset) starts the pass the loader set up.

    It and the iterators hold the loader weakly: as with torch, ``del loader`` (or its iterator) frees the workers at
    once, without waiting for the cycle collector."""

    def __init__(self, loader: DataLoader) -> None:
        self._loader = weakref.ref(loader)

    def __len__(self) -> int:
        return self._loader()._epoch_len()

    def __iter__(self) -> Iterator:
        return self._loader()._pass_indices()


class TrackedIter:
    """Shared by the single- and multi-process iterators: counts each batch delivered (or raised) at its position."""

    @property
    def _dp(self) -> DataLoader:
        return self._dp_ref()

    def _track(self, loader: DataLoader) -> None:
        self._dp_ref = weakref.ref(loader)
        self._discard = loader._pass_discard
        self._task: int | None = None
        self._sent = 0
        self._ended = False
        self._resumed, self._got_any, self._next_pass = self._discard > 0, False, None

    def _reset(self, loader, first_iter: bool = False) -> None:
        self._sent, self._discard, self._ended = 0, loader._pass_discard, False
        self._resumed, self._got_any, self._next_pass = self._discard > 0, False, None
        super()._reset(loader, first_iter)

    def _end(self) -> None:
        if not self._ended and self._dp is not None:  # once per pass, however often next() is called
            self._ended = True
            self._dp._pass_finished()

    def __next__(self):
        if self._next_pass is not None:
            return next(self._next_pass)
        dp = self._dp
        if dp is None:  # the loader is gone (only its iterator is used): nothing left to count for
            return super().__next__()
        while self._discard:  # an IterableDataset resumes by reading and dropping what was delivered before
            self._discard -= 1
            try:
                super().__next__()
            except StopIteration:
                self._discard = 0
                self._end()
                raise
            except Exception:  # noqa: BLE001  that batch failed before the checkpoint too; it was counted then
                pass
        self._task = None
        try:
            data = super().__next__()
        except StopIteration:
            self._end()
            if self._resumed and not self._got_any:
                # an IterableDataset checkpointed at its epoch's end: this pass is the next epoch, as uninterrupted
                self._resumed = False
                nxt = iter(dp)
                if nxt is self:  # persistent workers: reset in place
                    return self.__next__()
                self._next_pass = nxt
                return next(nxt)
            raise
        except BaseException:
            self._got_any = True
            self._count(dp)
            raise
        self._got_any = True
        self._count(dp)
        return data

    _defer = False  # set by DeviceIter: the batch counts when it is handed over, a step later

    def _count(self, dp) -> None:
        if self._defer:
            self.last_task = self._task
        elif self._task is not None:
            dp._delivered(self._task)


class DeviceIter:
    """``DataLoader(device=...)``: torch's iterator, each batch copied to ``device`` one step ahead (a CUDA side
    stream, see ``datapipe.prefetch.DevicePrefetcher``). A batch counts as delivered when it is handed over, so the
    loader's state stays exact; an exception raised by one batch reaches the caller at that batch's turn."""

    def __init__(self, it: TrackedIter, loader: DataLoader, device) -> None:
        from datapipe.prefetch import DevicePrefetcher

        it._defer = True
        self._it, self._loader = it, weakref.ref(loader)
        self._prefetcher = DevicePrefetcher(self._tagged(), device)

    def _tagged(self):
        while True:
            try:
                data = next(self._it)
            except StopIteration:
                return
            except Exception as e:  # noqa: BLE001  handed over (raised) at its turn
                yield ("error", e, self._it.last_task)
            else:
                yield ("batch", data, self._it.last_task)

    def __iter__(self) -> DeviceIter:
        return self

    def __len__(self) -> int:
        return len(self._it)

    def __next__(self):
        loader = self._loader()
        try:
            kind, value, task = next(self._prefetcher)
        except StopIteration:
            if loader is not None:
                loader._pass_finished()
            raise
        if loader is not None and task is not None:
            loader._delivered(task)
        if kind == "error":
            raise value
        return value


class SingleProcessIter(TrackedIter, _SingleProcessDataLoaderIter):
    def __init__(self, loader) -> None:
        self._track(loader)
        super().__init__(loader)
        self._threads = None
        if loader.prefetch:
            from datapipe.prefetch import ThreadPrefetcher

            fetcher = self._dataset_fetcher
            self._threads = ThreadPrefetcher(fetcher.fetch, self._sampler_iter, depth=loader.prefetch,
                                             num_threads=min(loader.prefetch, 4))

    def _next_index(self):
        index = super()._next_index()
        self._task, self._sent = self._sent, self._sent + 1
        return index

    def _next_data(self):
        if self._threads is None:
            data = self._dataset_fetcher.fetch(self._next_index())
        else:
            self._task, self._sent = self._sent, self._sent + 1  # results come in source order: the k-th is task k
            data = next(self._threads)
        if self._pin_memory:
            data = pinned(data, self._pin_memory_device)
        return data

    def _reset(self, loader, first_iter: bool = False) -> None:
        super()._reset(loader, first_iter)
        if getattr(self, "_threads", None) is not None:
            self._threads.close()
            from datapipe.prefetch import ThreadPrefetcher

            self._threads = ThreadPrefetcher(self._dataset_fetcher.fetch, self._sampler_iter,
                                             depth=loader.prefetch, num_threads=min(loader.prefetch, 4))

    def __del__(self) -> None:
        if getattr(self, "_threads", None) is not None:
            self._threads.close()


class MultiProcessIter(TrackedIter, _MultiProcessingDataLoaderIter):
    def __init__(self, loader) -> None:
        self._track(loader)
        self._last_idx = None
        super().__init__(loader)

    def _get_data(self):
        idx, data = super()._get_data()
        self._last_idx = idx
        return idx, data

    def _process_data(self, data, worker_idx):
        # out of order, the batch handed over is the one just received; in order, the one at the receive cursor
        self._task = self._last_idx if not self._in_order else self._rcvd_idx - 1
        return super()._process_data(data, worker_idx)


def skipping(items, start: int, ahead, positions: list | None, arrays: bool) -> Iterator:
    for pos, item in enumerate(items, start):
        if pos in ahead:
            continue
        if positions is not None:
            positions.append(pos)
        if isinstance(item, np.ndarray) and not arrays:
            item = item.tolist()  # a dataset not of this library gets Python ints, as from torch's samplers
        yield item


def ordered_items(loader_ref, src, epoch: int, start: int) -> Iterator:
    """Torch's (or the seeded) order of one epoch, drawn at the first ``next()`` as torch's samplers draw it."""
    sampler = src.sampler if type(src) is tud.BatchSampler else src
    if isinstance(sampler, SeededRandomSampler):
        sampler.set_epoch(epoch)
    loader = loader_ref()  # None when only the iterator is left (``for b in DataLoader(...)``): nothing to record
    order, record = epoch_order(sampler, epoch, None if loader is None else loader._record)
    if loader is not None:
        loader._record = record
    del loader
    if type(src) is not tud.BatchSampler:  # batch_size=None: one index at a time
        yield from order[start:].tolist()
        return
    bs = src.batch_size
    stop = len(order) - len(order) % bs if src.drop_last else len(order)
    for b0 in range(start * bs, stop, bs):
        yield order[b0 : b0 + bs]


def replayed_items(sampler, start: int) -> Iterator:
    it = iter(sampler)
    for _ in range(start):
        if next(it, None) is None:
            return
    yield from it


def pinned(data, device):
    """Pin a batch: tensors in dicts/lists/tuples into recycled page-locked buffers (``datapipe.prefetch.pin``: no
    fresh page-locked allocation per batch), anything else as torch pins it."""
    from datapipe.prefetch import pin

    if isinstance(data, (torch.Tensor, Mapping, list, tuple)) and not hasattr(data, "pin_memory"):
        return pin(data)
    return torch.utils.data._utils.pin_memory.pin_memory(data, device)
