"""``datapipe.DataLoader``: ``torch.utils.data.DataLoader`` with exact ``state_dict`` / ``load_state_dict`` and
``set_epoch``.

It is a subclass taking every torch argument, and ``iter(loader)`` is torch's own iterator class (subclassed), so
``from datapipe import DataLoader`` is the only change a user makes. Its state counts batches *delivered to the
caller* (not batches the workers prefetched; a batch whose loading raised counts as delivered, so the loop that
caught the error goes on with the next one and a resume neither repeats nor skips it), with any ``num_workers``,
``persistent_workers`` and ``in_order=False`` (the batches delivered ahead of the first missing one are recorded).

Where the order of a pass comes from, and how a resume finds it again:

* a batch sampler with the datapipe contract (every ``samplers.*``): the loader positions it through its one entry
  (``set_epoch`` / ``load_state_dict``), so its epoch hooks run, and nests its state (options, metadata digest,
  elastic segments) in the loader's;
* torch's ``RandomSampler`` / ``SequentialSampler`` (the defaults of ``shuffle=True/False``, or passed by the user):
  the loader draws *the same* order torch would, consuming the RNG as torch does, and records the drawn seed (or
  the ``generator``'s state at the start of the epoch) so a restart redraws it. ``seed=`` instead gives an order
  that is a pure function of ``(seed, epoch)`` and consumes no RNG;
* any other sampler is replayed: its indices for the delivered batches are drawn and skipped (no data is loaded),
  which is exact when the sampler is deterministic for an epoch (``DistributedSampler`` after ``set_epoch``). The
  loader never calls ``set_epoch`` on such a sampler: the user's call wins, as with torch;
* an ``IterableDataset`` is fast-forwarded by loading and discarding the delivered batches (refused when the worker
  count changed, since the stream depends on it, unless the dataset has its own ``state_dict``).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator, Mapping
from typing import TypeVar

import numpy as np
import torch
import torch.utils.data as tud

from datapipe.loader_iters import (DeviceIter, IndexSource, MultiProcessIter, SingleProcessIter, ordered_items,
                                   replayed_items, skipping)
from datapipe.orders import (SeededRandomSampler, epoch_order, generator_state, is_reproducible,
                             set_generator_state)
from samplers.base import BatchSamplerBase

__all__ = ["DataLoader", "SeededRandomSampler"]

STATE_VERSION = 2
T_co = TypeVar("T_co", covariant=True)


def _kind(loader) -> str:
    if loader._iterable:
        return "iterable"
    src = loader._index_sampler_torch()
    if isinstance(src, BatchSamplerBase):
        return "native"
    if type(src) is tud.BatchSampler and is_reproducible(src.sampler):
        return "ordered"
    if loader.batch_sampler is None and is_reproducible(src):
        return "ordered"
    return "replay"


def _dataset_identity(ds) -> dict:
    out = {"type": type(ds).__name__}
    fp = getattr(ds, "fingerprint", None)
    if callable(fp):
        fp = fp()
    if isinstance(fp, str):
        out["fingerprint"] = fp
    return out


class DataLoader(tud.DataLoader[T_co]):
    """``torch.utils.data.DataLoader`` plus ``state_dict()``, ``load_state_dict()`` and ``set_epoch()``.

    Every torch argument is accepted with its torch meaning, and the default samplers draw torch's own orders
    (``torch.manual_seed`` before an epoch gives the order plain torch gives). Additions:

    Args:
        seed: with ``shuffle=True`` and no sampler, shuffle with :class:`SeededRandomSampler`: each epoch's order is
            a pure function of ``(seed, epoch)`` and no RNG is consumed.
        shard_window: with ``shuffle=True`` over a dataset on object storage (``dataset.is_remote``, e.g.
            ``ArrowDataset.open("s3://...")``), the loader's own order is shard-local: rows are shuffled within
            windows of this many shards (the shards themselves in a random order), so a batch reads one or two
            windows of shards instead of nearly every shard (:class:`SeededRandomSampler`; the epoch's seed is
            drawn from torch's RNG as torch does, or derived from ``seed``). Pass a sampler for a global shuffle.
        prefetch: with ``num_workers=0``, load this many batches ahead on a small thread pool in this process
            (``datapipe`` datasets and collators release the GIL); results come in plan order and the state still
            counts batches delivered. ``0`` (default): load each batch when it is asked for, as torch does.
        device: copy each batch to this device one step ahead (on a CUDA side stream; with ``pin_memory=True``
            the copy is asynchronous). ``iter(loader)`` is then a thin wrapper around torch's iterator; the state
            counts a batch when it is handed over.

    The epoch advances by itself when an epoch ends (or at a new ``iter()`` after an abandoned pass), so
    ``for epoch in range(E): for batch in loader`` goes through the epochs; ``set_epoch`` chooses the next one, and
    a datapipe sampler's own ``set_epoch`` by the user wins too. ``len(loader)`` is the length of the epoch the
    next ``iter()`` runs.
    """

    def __init__(self, dataset, batch_size: int | None = 1, shuffle: bool | None = None, sampler=None,
                 batch_sampler=None, num_workers: int = 0, collate_fn=None, pin_memory: bool = False,
                 drop_last: bool = False, timeout: float = 0, worker_init_fn=None, multiprocessing_context=None,
                 generator=None, *, prefetch_factor: int | None = None, persistent_workers: bool = False,
                 pin_memory_device: str = "", in_order: bool = True, seed: int | None = None, prefetch: int = 0,
                 shard_window: int = 8,
                 device: str | torch.device | None = None):
        if collate_fn is None and hasattr(dataset, "__getitems__") and batch_size is not None \
                and _ours(dataset):
            from datapipe.collate import default

            collate_fn = default
        if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool)):
            raise TypeError(f"seed must be an int or None (got {type(seed).__name__})")
        own_order = shuffle and sampler is None and batch_sampler is None and not isinstance(dataset, tud.IterableDataset)
        if own_order and getattr(dataset, "is_remote", False):
            # shards on object storage come through a bounded cache: a global shuffle would read nearly every shard
            # per batch, a shard-local one reads `shard_window` shards at a time
            sampler, shuffle = SeededRandomSampler(dataset, None if seed is None else int(seed),
                                                   shard_offsets=dataset.shard_offsets, shard_window=shard_window), None
        elif own_order and seed is not None:
            sampler, shuffle = SeededRandomSampler(dataset, int(seed)), None
        if not isinstance(prefetch, (int, np.integer)) or isinstance(prefetch, bool) or prefetch < 0:
            raise ValueError(f"prefetch must be an integer >= 0 (got {prefetch=})")
        if prefetch and num_workers:
            raise ValueError(f"prefetch={prefetch} loads batches on threads of this process; it cannot be combined "
                             f"with num_workers={num_workers} (worker processes already load ahead: use "
                             "prefetch_factor for them)")
        super().__init__(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                         batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate_fn,
                         pin_memory=pin_memory, drop_last=drop_last, timeout=timeout, worker_init_fn=worker_init_fn,
                         multiprocessing_context=multiprocessing_context, generator=generator,
                         prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
                         pin_memory_device=pin_memory_device, in_order=in_order)
        self.seed = None if seed is None else int(seed)
        self.prefetch = int(prefetch)
        self.device = None if device is None else torch.device(device)
        self._iterable = isinstance(dataset, tud.IterableDataset)
        self._source = IndexSource(self)
        self._arrays = _ours(dataset)  # datapipe datasets take int64 arrays; others get Python ints, as from torch
        self._epoch = 0
        self._prefix = 0  # batches of the epoch delivered in a row from its start
        self._ahead: set[int] = set()  # batches delivered past the prefix (in_order=False)
        self._record: dict | None = None  # how this epoch's torch order was drawn (to redraw it)
        self._fresh = True  # positioned at a point no pass has started from yet
        self._sampler_epoch = None  # the epoch this loader last set on a datapipe sampler
        self._pass_prefix, self._pass_ahead, self._pass_discard = 0, frozenset(), 0
        self._positions: list[int] | None = None

    # ---- torch plumbing -----------------------------------------------------------------------------------
    def _index_sampler_torch(self):
        return self.batch_sampler if self._auto_collation else self.sampler

    @property
    def _index_sampler(self):
        if getattr(self, "_source", None) is None or self._iterable:
            return super()._index_sampler
        return self._source

    def _get_iterator(self):
        return SingleProcessIter(self) if self.num_workers == 0 else MultiProcessIter(self)

    def __len__(self) -> int:
        if getattr(self, "_source", None) is not None and not self._iterable:
            return self._epoch_len()
        return super().__len__()

    # ---- position -----------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch

    def _native(self) -> BatchSamplerBase | None:
        src = self._index_sampler_torch()
        return src if not self._iterable and isinstance(src, BatchSamplerBase) else None

    def _move(self, epoch: int) -> None:
        """Position at the start of ``epoch`` (runs a datapipe sampler's epoch hook now)."""
        self._epoch, self._prefix, self._ahead, self._record, self._fresh = epoch, 0, set(), None, True
        s = self._native()
        if s is not None:
            s.set_epoch(epoch)
            s.reset(None)  # the start of the epoch, even if the sampler was restored mid-epoch before
            self._sampler_epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next ``iter()`` (from its first batch)."""
        if not isinstance(epoch, (int, np.integer)) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0 (got {epoch=})")
        self._move(int(epoch))

    def _epoch_len(self) -> int:
        kind = _kind(self)
        if kind == "native":
            s = self._native()
            if self._sampler_epoch is None or s.epoch != self._sampler_epoch:
                self._adopt_sampler_epoch(s)
            return len(s)
        return len(self._index_sampler_torch())

    def _adopt_sampler_epoch(self, s: BatchSamplerBase) -> None:
        """The user (or nobody yet) positioned the datapipe sampler: its epoch wins over the loader's."""
        if self._sampler_epoch is None and s.epoch == self._epoch and self._fresh:
            self._sampler_epoch = s.epoch
            return
        self._epoch, self._prefix, self._ahead, self._record, self._fresh = s.epoch, 0, set(), None, True
        self._sampler_epoch = s.epoch

    def __iter__(self):
        s = self._native()
        if s is not None and self._sampler_epoch is not None and s.epoch != self._sampler_epoch:
            self._adopt_sampler_epoch(s)
        elif not self._fresh:  # a new iter() after an abandoned (or restored-and-finished) pass: the next epoch
            self._move(self._epoch + 1)
        elif s is not None and self._sampler_epoch is None:
            self._adopt_sampler_epoch(s)
        self._fresh = False
        self._pass_prefix, self._pass_ahead = self._prefix, frozenset(self._ahead)
        self._pass_discard = self._prefix if self._iterable else 0
        if hasattr(self.collate_fn, "set_epoch"):
            # e.g. ImmiscibleCollate keys its noise by (rows, epoch); persistent workers keep the copy they got
            # at their start, so such a collate should not rely on it there
            self.collate_fn.set_epoch(self._epoch)
        it = super().__iter__()
        return it if self.device is None else DeviceIter(it, self, self.device)

    def _pass_indices(self) -> Iterator:
        """The indices of the current pass, from the loader's position; records each item's position. The
        generators below hold no reference to the loader (see :class:`IndexSource`)."""
        kind = _kind(self)
        start, ahead = self._pass_prefix, self._pass_ahead
        positions = self._positions = [] if ahead else None
        if kind == "native":
            s = self._native()
            s.seek(start)
            self._sampler_epoch = s.epoch
            items = s
            hint = getattr(self.dataset, "prefetch_plan", None)
            if hint is not None and self.num_workers == 0:
                # a remote dataset downloads shards in the order this pass will read them: a copy of the sampler
                # (same plan, its own cursor) walks the pass on the dataset's background thread
                hint(iter(copy.copy(s)))
        elif kind == "ordered":
            src = self._index_sampler_torch()
            items = ordered_items(weakref.ref(self), src, self._epoch, start)
        else:
            items = replayed_items(self._index_sampler_torch(), start)
        return skipping(items, start, ahead, positions, self._arrays)

    def _order_generator(self) -> torch.Generator | None:
        """The generator a torch RandomSampler of this loader draws its order from (None: the global RNG)."""
        if self._iterable or _kind(self) != "ordered":
            return None
        src = self._index_sampler_torch()
        sampler = src.sampler if type(src) is tud.BatchSampler else src
        return getattr(sampler, "generator", None) if type(sampler) is tud.RandomSampler else None

    def _delivered(self, task: int) -> None:
        if self._iterable:
            self._prefix += 1
            return
        pos = self._pass_prefix + task if self._positions is None else self._positions[task]
        if pos == self._prefix:
            self._prefix += 1
            while self._prefix in self._ahead:
                self._ahead.discard(self._prefix)
                self._prefix += 1
        else:
            self._ahead.add(pos)

    def _pass_finished(self) -> None:
        """The pass ran to its end: the next iter() starts the next epoch (len() already describes it)."""
        if self._iterable or (not self._ahead and self._prefix >= self._epoch_len()):
            self._move(self._epoch + 1)

    # ---- state --------------------------------------------------------------------------------------------
    def _config(self) -> dict:
        src = self._index_sampler_torch() if not self._iterable else None
        cfg = {"dataset": _dataset_identity(self.dataset), "order": _kind(self),
               "sampler": type(src).__name__ if src is not None else None}
        if not self._iterable and not isinstance(src, BatchSamplerBase):
            cfg["rows"] = len(self.dataset) if hasattr(self.dataset, "__len__") else None
            cfg["batch_size"], cfg["drop_last"] = self.batch_size, bool(self.drop_last)
            inner = src.sampler if type(src) is tud.BatchSampler else src
            if isinstance(inner, SeededRandomSampler):
                cfg["seed"] = inner.seed
                if inner.shard_offsets is not None:
                    cfg["shard_window"] = inner.shard_window
        if self._iterable:
            cfg["batch_size"], cfg["num_workers"] = self.batch_size, self.num_workers
        return cfg

    def state_dict(self) -> dict:
        """Small and JSON-serialisable: the epoch, the batches delivered (and those delivered ahead with
        ``in_order=False``), how the epoch's order was drawn, the configuration it belongs to, and a datapipe
        sampler's own state nested under ``"sampler_state"``."""
        record = self._record
        gen = self._order_generator()
        if record is None and gen is not None:
            # the epoch's order is not drawn yet: it will come from this generator's state (as torch draws it)
            record = {"generator_state_at_save": generator_state(gen)}
        state = {"version": STATE_VERSION, "epoch": self._epoch, "batches_delivered": self._prefix,
                 "delivered_ahead": sorted(self._ahead), "order_record": record, "config": self._config()}
        s = self._native()
        if s is not None:
            if self._sampler_epoch is None or s.epoch != self._sampler_epoch:
                self._adopt_sampler_epoch(s)
            state["sampler_state"] = {**s.state_dict(), "batches_yielded": self._prefix}
        if self._iterable and hasattr(self.dataset, "state_dict"):
            state["dataset_state"] = self.dataset.state_dict()
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Resume: the next ``iter()`` continues epoch ``state["epoch"]`` after its delivered batches. Refuses a
        state of another configuration (dataset, sampler options, batch size, seed, ...) naming what differs."""
        if not isinstance(state, Mapping):
            raise TypeError(f"DataLoader.load_state_dict expects the dict from state_dict() (got {type(state)})")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not supported (this is "
                             f"{STATE_VERSION}); pass the dict returned by DataLoader.state_dict()")
        expected = {"version", "epoch", "batches_delivered", "delivered_ahead", "order_record", "config"}
        optional = {"sampler_state", "dataset_state"}
        missing, unknown = expected - set(state), set(state) - expected - optional
        if missing or unknown:
            raise ValueError(f"DataLoader.load_state_dict: missing keys {sorted(missing)}, unknown keys "
                             f"{sorted(unknown)}; pass the dict returned by state_dict()")
        epoch, prefix, ahead = state["epoch"], state["batches_delivered"], state["delivered_ahead"]
        for name, v in (("epoch", epoch), ("batches_delivered", prefix)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
                raise ValueError(f"state[{name!r}] must be an integer >= 0 (got {v!r})")
        mine = self._config()
        for k in [*mine, *(k for k in state["config"] if k not in mine)]:
            if mine.get(k) != state["config"].get(k):
                raise ValueError(f"the state was saved by a loader with {k}={state['config'].get(k)!r}, this one has "
                                 f"{k}={mine.get(k)!r}: it cannot resume another configuration")
        if self._iterable and "dataset_state" in state:
            self.dataset.load_state_dict(state["dataset_state"])
            prefix = 0  # the dataset resumes itself
        s = self._native()
        if s is not None:
            nested = state.get("sampler_state")
            if nested is None:
                raise ValueError("the state has no sampler_state, but this loader's batch sampler is "
                                 f"{type(s).__name__}: it was saved by another configuration")
            if ahead and int(nested.get("world_size", s.world_size)) != s.world_size:
                raise ValueError("this state was saved with in_order=False and batches delivered out of order; it "
                                 "can resume at the same world size only (save it with in_order=True to resume "
                                 "elastically)")
            s.load_state_dict({**nested, "batches_yielded": int(prefix)})  # raises on another configuration
            epoch, prefix = s.position  # an elastic resume restarts the count in the rest of the epoch
            self._sampler_epoch = s.epoch
        self._epoch, self._prefix, self._ahead = int(epoch), int(prefix), {int(a) for a in ahead}
        self._record = dict(state["order_record"]) if state["order_record"] else None
        if self._record and "generator_state_at_save" in self._record:
            gen = self._order_generator()
            if gen is not None:
                set_generator_state(gen, self._record["generator_state_at_save"])
            self._record = None
        self._fresh = True
        if not self._iterable:
            n = self._epoch_len()
            if self._prefix > n:
                raise ValueError(f"batches_delivered={self._prefix} exceeds the {n} batches of epoch {self._epoch}")
            if self._prefix == n and not self._ahead:  # saved at an epoch's end: the next iter() runs the next
                if self._record and "generator_state" in self._record:
                    # leave the generator where the finished epoch's draws left it, as in the uninterrupted run
                    src = self._index_sampler_torch()
                    epoch_order(src.sampler if type(src) is tud.BatchSampler else src, self._epoch, self._record)
                self._move(self._epoch + 1)


def _ours(dataset) -> bool:
    """Datasets of this library take int64 index arrays in ``__getitems__``; any other gets what torch gives."""
    return type(dataset).__module__.split(".")[0] == "datapipe"
