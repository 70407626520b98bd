"""``datapipe.DataLoader``: ``torch.utils.data.DataLoader`` with exact ``state_dict`` / ``load_state_dict`` and
``set_epoch``.

It is a subclass taking every torch argument, so ``from datapipe import DataLoader`` is the only change a user
makes. Its state counts batches *delivered to the caller* (not batches the workers prefetched), so resuming
after a crash neither repeats nor skips a batch, with any ``num_workers`` and with ``persistent_workers``.

How the resume happens:

* a batch sampler with the datapipe contract (``state_dict``/``load_state_dict``, e.g. every ``samplers.*``) is
  set to (epoch, batches delivered) and recomputes its plan: O(1), nothing is read;
* the default torch samplers (``shuffle=True/False`` with no sampler given) are replaced by a seeded
  ``samplers.RandomBatchSampler`` drawing the same kind of order, so they resume the same way;
* any other sampler is replayed: its indices for the consumed batches are drawn and skipped (no data is loaded),
  which is exact when the sampler is deterministic for an epoch (``DistributedSampler`` with ``set_epoch`` is);
* an ``IterableDataset`` is fast-forwarded by loading and discarding the consumed batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch
import torch.utils.data as tud

from samplers.random import RandomBatchSampler

STATE_VERSION = 1


class _IndexSampler:
    """Wraps the loader's index sampler: positions it at (epoch, skip) and hands out numpy index arrays."""

    def __init__(self, inner, batched: bool):
        self.inner = inner
        self.batched = batched
        self.epoch = 0
        self.skip = 0
        self.native = all(hasattr(inner, a) for a in ("state_dict", "load_state_dict", "set_epoch")) and \
            "batches_yielded" in getattr(inner, "state_dict", lambda: {})()

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator:
        skip, self.skip = self.skip, 0
        if self.native:
            state = self.inner.state_dict()
            state.update(epoch=self.epoch, batches_yielded=skip)
            self.inner.load_state_dict(state)
            yield from self.inner
            return
        for target in (self.inner, getattr(self.inner, "sampler", None)):  # a BatchSampler's sampler too
            if hasattr(target, "set_epoch"):
                target.set_epoch(self.epoch)
                break
        it = iter(self.inner)
        for _ in range(skip):
            if next(it, None) is None:
                return
        if self.batched:
            for b in it:
                yield np.asarray(b, dtype=np.int64) if not isinstance(b, np.ndarray) else b
        else:
            yield from it


class DataLoader(tud.DataLoader):
    """``torch.utils.data.DataLoader`` plus ``state_dict()``, ``load_state_dict()`` and ``set_epoch()``.

    Every torch argument is accepted with its torch meaning. Additions:

    Args:
        seed: seed of the shuffled order when ``shuffle=True`` and no sampler is given (default: drawn from
            ``generator`` or torch's global RNG, as torch does, and stored in the state).

    The epoch advances by itself at each new ``iter()`` (so ``for epoch in range(E): for batch in loader``
    reshuffles), unless ``set_epoch`` was called since the last ``iter()``; samplers with ``set_epoch`` get it.
    """

    def __init__(self, dataset, batch_size: int | None = 1, shuffle: bool | None = None, sampler=None,
                 batch_sampler=None, num_workers: int = 0, collate_fn=None, pin_memory: bool = False,
                 drop_last: bool = False, timeout: float = 0, worker_init_fn=None, multiprocessing_context=None,
                 generator=None, *, prefetch_factor: int | None = None, persistent_workers: bool = False,
                 pin_memory_device: str = "", in_order: bool = True, seed: int | None = None):
        if collate_fn is None and hasattr(dataset, "__getitems__") and batch_size is not None:
            from datapipe.collate import default

            collate_fn = default
        super().__init__(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                         batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate_fn,
                         pin_memory=pin_memory, drop_last=drop_last, timeout=timeout, worker_init_fn=worker_init_fn,
                         multiprocessing_context=multiprocessing_context, generator=generator,
                         prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
                         pin_memory_device=pin_memory_device, in_order=in_order)
        if seed is None:
            seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())
        self.seed = int(seed)
        iterable = isinstance(dataset, tud.IterableDataset)
        inner = None
        if not iterable and batch_sampler is None and sampler is None and batch_size is not None:
            # torch built RandomSampler/SequentialSampler + BatchSampler: use the seeded, resumable equivalent
            inner = RandomBatchSampler(len(dataset), batch_size, shuffle=bool(shuffle), seed=self.seed, rank=0,
                                       world_size=1, drop_last=drop_last) if len(dataset) else None
        if inner is None:
            inner = self.batch_sampler if self.batch_sampler is not None else self.sampler
        self._iterable = iterable
        self._wrapped = _IndexSampler(inner, batched=self.batch_sampler is not None)
        self._epoch = 0
        self._delivered = 0
        self._started = False
        self._explicit = False
        self._resume = False

    # torch's iterators read the index sampler through this property (also on persistent-worker resets)
    @property
    def _index_sampler(self):
        if getattr(self, "_wrapped", None) is None or self._iterable:
            return super()._index_sampler
        return self._wrapped

    def __len__(self) -> int:
        if getattr(self, "_wrapped", None) is not None and not self._iterable:
            return len(self._wrapped)
        return super().__len__()

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next ``iter()`` (from its first batch)."""
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0 (got {epoch=})")
        self._epoch, self._delivered, self._explicit, self._resume = int(epoch), 0, True, False

    def __iter__(self):
        if self._resume:
            self._resume = False
            if not self._iterable and self._delivered >= len(self):  # saved at an epoch's end: go on to the next
                self._epoch, self._delivered = self._epoch + 1, 0
        elif self._started and not self._explicit:
            self._epoch, self._delivered = self._epoch + 1, 0
        else:
            self._delivered = 0
        self._started, self._explicit = True, False
        skip = self._delivered
        if hasattr(self.collate_fn, "set_epoch"):
            # e.g. ImmiscibleCollate keys its noise by (rows, epoch); persistent workers keep the copy they got
            # at their start, so such a collate should not rely on it there
            self.collate_fn.set_epoch(self._epoch)
        if not self._iterable:
            self._wrapped.epoch, self._wrapped.skip = self._epoch, skip
        base = super().__iter__()
        return self._deliver(base, skip if self._iterable else 0)

    def _deliver(self, base, discard: int):
        if discard:
            # an iterable dataset is fast-forwarded; if the checkpoint was at its epoch's end, go on to the next
            sentinel = object()
            for _ in range(discard):
                if next(base, sentinel) is sentinel:
                    break
            first = next(base, sentinel)
            if first is sentinel:
                self._epoch, self._delivered = self._epoch + 1, 0
                base = super().__iter__()
            else:
                self._delivered += 1
                yield first
        for batch in base:
            self._delivered += 1
            yield batch

    # ---- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``{"version", "epoch", "batches_delivered", "seed"}``: small, JSON-serialisable."""
        return {"version": STATE_VERSION, "epoch": self._epoch, "batches_delivered": self._delivered,
                "seed": self.seed}

    def load_state_dict(self, state: Mapping) -> None:
        """Resume: the next ``iter()`` continues epoch ``state["epoch"]`` after its delivered batches."""
        expected = {"version", "epoch", "batches_delivered", "seed"}
        if set(state) != expected:
            raise ValueError(f"DataLoader.load_state_dict: expected keys {sorted(expected)}, got {sorted(state)}")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"state version {state['version']} is not supported (this is {STATE_VERSION})")
        if int(state["batches_delivered"]) < 0 or int(state["epoch"]) < 0:
            raise ValueError(f"epoch and batches_delivered must be >= 0 (got {dict(state)})")
        self.seed = int(state["seed"])
        inner = self._wrapped.inner if getattr(self, "_wrapped", None) is not None else None
        if isinstance(inner, RandomBatchSampler) and inner is not self.batch_sampler:
            inner.seed = self.seed
            inner._cache = None
        self._epoch = int(state["epoch"])
        self._delivered = int(state["batches_delivered"])
        if not self._iterable and self._delivered > len(self):
            raise ValueError(f"batches_delivered={self._delivered} exceeds this loader's {len(self)} batches")
        self._resume, self._explicit, self._started = True, False, True
