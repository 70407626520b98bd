"""Windowed plans: batches of a 1e9-row epoch computed window by window, in memory per batch, not per row.

The rows are grouped in blocks of contiguous rows, the blocks permuted by a stateless Feistel permutation, and each
window (a contiguous range of that block permutation, read through a memory map almost sequentially) is planned on
its own by a sampler-specific kernel (sorted-and-cut token budgets, best-fit packs, ...). A counting pass gives
every window's batch sizes once per epoch; the batches are then dealt window by window: the windows in a seeded
random order, each window's batches in a random order of their own (``native.windows.window_major_order``), and a
batch's rows are computed from its window alone when it is yielded. Dealing window by window keeps the batches
(and their mixing) as they are and changes only their order: a rank plans each window once per ``batches in the
window / world_size`` steps (at 1e9 rows, ~0.04 ms per batch instead of 4-10 ms when every batch came from another
window); consecutive steps draw from one window, itself a random sample of the corpus (random blocks of 16 rows).

:class:`WindowedStream` is that machinery, shared by the samplers that use it
(``TokenBudgetBatchSampler``, ``PackedDurationSampler``): the counting pass (kept by a
:class:`samplers.plan_cache.PlanCache`, on disk for memory-mapped metadata), the deal, the window cache, the
lookup of a stream position's rows and the materialised plan. A sampler supplies its kernels through the
constructor: ``count(w0, w1, epoch) -> (sizes per window, totals)``, ``batches(w, epoch) -> (rows, offsets)``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from native.feistel import mix_prefix
from native.windows import window_major_order
from samplers.base import Plan
from samplers.lazy_plan import SizePlan, arrange_sizes, even_out_sizes
from samplers.plan_cache import PlanCache, check_window

__all__ = ["DEAL_SALT", "MAX_PLAN_ROWS", "WindowedPlan", "WindowedStream"]

#: ``global_plan()`` refuses to materialise a windowed plan of more rows than this.
MAX_PLAN_ROWS = 1 << 28
#: Sub-seed of the deal (plan batch -> window-order batch).
DEAL_SALT = 0xBA7C


class WindowedStream:
    """The windowed batches of one sampler's metadata and options, epoch by epoch.

    Args:
        source: the metadata array the kernels read (its file identity keys the disk cache).
        cache: where counting passes are kept (one :class:`PlanCache` per sampler kind).
        key: ``key(epoch)``: the cache key of an epoch's counting pass (digest of the metadata, options, seed).
        num_windows: windows of the epoch.
        count: ``count(w0, w1, epoch) -> (list of int batch-size arrays, one per window, 2-D array of per-window
            statistics [w1 - w0, k])``; the statistics of all windows are kept in window order (``window_stats``).
        batches: ``batches(w, epoch) -> (int64 rows, int64 offsets)`` of window ``w``.
        deal_seed: ``deal_seed(epoch)``: seed of the deal, or None to keep the window order.
        dropped: ``dropped(window_stats) -> {reason: rows}``.
        what: what a batch is called in errors (``"batches"``, ``"packs"``).
    """

    def __init__(self, source: NDArray, cache: PlanCache, key: Callable[[int], tuple], num_windows: int,
                 count: Callable, batches: Callable, deal_seed: Callable[[int], int | None],
                 dropped: Callable[[dict], dict], what: str = "batches") -> None:
        self.source, self.cache, self.key, self.num_windows = source, cache, key, int(num_windows)
        self._count_windows, self._batches, self.deal_seed, self._dropped = count, batches, deal_seed, dropped
        self.what = what
        self._epochs: OrderedDict = OrderedDict()  # epoch -> tables (the last two)
        self._windows: OrderedDict = OrderedDict()  # (epoch, window) -> (rows, offsets) (the last four)

    #: windows per call of the counting kernel (bounds its temporaries)
    COUNT_WINDOWS = 64

    def tables(self, epoch: int) -> dict:
        """The counting pass of an epoch (``wcum``: first batch of each window; ``by_window``: batch sizes window
        after window; ``window_stats``; ``dropped``), plus the deal: ``order`` (plan batch -> window-order batch, None
        when not dealt), ``sizes`` (batch sizes in plan order) and ``voff`` (their stream offsets)."""
        if epoch in self._epochs:
            self._epochs.move_to_end(epoch)
            return self._epochs[epoch]
        t = dict(self.cache.memo(self.key(epoch), self.source, lambda: self._count(epoch)))
        by_window = t["by_window"]
        nb = len(by_window)
        seed = self.deal_seed(epoch)
        order = window_major_order(t["wcum"], seed, mix_prefix(seed, 1)) if seed is not None and nb else None
        t["order"] = order
        t["sizes"] = by_window.astype(np.int64) if order is None else by_window[order].astype(np.int64)
        t["voff"] = np.zeros(nb + 1, dtype=np.int64)
        np.cumsum(t["sizes"], out=t["voff"][1:])
        t["dropped"] = self._dropped(t["window_stats"])
        self._epochs[epoch] = t
        while len(self._epochs) > 2:
            self._epochs.popitem(last=False)
        return t

    def _count(self, epoch: int) -> dict:
        parts: list = []
        stats: list = []
        for w0 in range(0, self.num_windows, self.COUNT_WINDOWS):
            sizes, st = self._count_windows(w0, min(self.num_windows, w0 + self.COUNT_WINDOWS), epoch)
            parts.extend(sizes)
            stats.append(np.asarray(st))
        wcum = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in parts], out=wcum[1:])
        by_window = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
        window_stats = np.concatenate(stats) if stats else np.zeros((0, 0))
        return {"wcum": wcum, "by_window": by_window, "window_stats": window_stats}

    def window(self, epoch: int, w: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Rows and batch offsets of window ``w`` (the last four kept), checked against the counting pass."""
        key = (epoch, w)
        if key not in self._windows:
            self._windows[key] = rows, off = self._batches(w, epoch)
            t = self.tables(epoch)
            check_window(t, w, np.diff(off), t["by_window"], t["wcum"], lambda: self.forget(epoch))
            while len(self._windows) > 4:
                self._windows.popitem(last=False)
        return self._windows[key]

    def forget(self, epoch: int) -> None:
        """Drop an epoch's counting pass (memory and disk), after it proved stale."""
        self.cache.forget(self.key(epoch), self.source)
        self._epochs.pop(epoch, None)

    def rows(self, epoch: int, start: int, stop: int) -> NDArray[np.int64]:
        """Rows at positions ``[start, stop)`` of the epoch's stream (plan batches one after another); a batch of
        the arranged plan never spans two plan batches (evening out only splits a batch)."""
        t = self.tables(epoch)
        g = int(np.searchsorted(t["voff"], start, side="right")) - 1
        wid = g if t["order"] is None else int(t["order"][g])
        w = int(np.searchsorted(t["wcum"], wid, side="right")) - 1
        rows, off = self.window(epoch, w)
        a = int(off[wid - int(t["wcum"][w])]) + start - int(t["voff"][g])
        return rows[a : a + stop - start].copy()

    def materialise(self, epoch: int, plan: SizePlan) -> Plan:
        """The arranged ``plan`` with its rows (each window planned once); refused above :data:`MAX_PLAN_ROWS`."""
        if plan.rows > MAX_PLAN_ROWS:
            raise ValueError(f"global_plan() would materialise {plan.rows} rows (> {MAX_PLAN_ROWS}); iterate the "
                             f"sampler instead, it computes {self.what} on demand")
        t = self.tables(epoch)
        starts = plan.base + plan.offsets[:-1]
        g = np.searchsorted(t["voff"], starts, side="right") - 1
        wid = g if t["order"] is None else t["order"][g]
        win = np.searchsorted(t["wcum"], wid, side="right") - 1
        rows = np.empty(plan.rows, dtype=np.int64)
        by_win = np.argsort(win, kind="stable")
        bounds = np.searchsorted(win[by_win], np.unique(win), side="right") if len(win) else []
        lo = 0
        for hi in bounds:  # each window planned once, its batches put in place
            sel = by_win[lo:hi]
            w = int(win[sel[0]])
            wrows, off = self._batches(w, epoch)
            check_window(t, w, np.diff(off), t["by_window"], t["wcum"], lambda: self.forget(epoch))
            for b in sel.tolist():
                a = int(off[wid[b] - t["wcum"][w]]) + int(starts[b] - t["voff"][g[b]])
                rows[plan.offsets[b] : plan.offsets[b + 1]] = wrows[a : a + int(plan.sizes[b])]
            lo = hi
        return Plan(rows, plan.offsets.copy(), dropped=dict(plan.dropped))


class WindowedPlan:
    """Mixin for a sampler (before ``BatchSamplerBase`` in its bases) whose plan, when ``self.windowed``, is the
    :class:`WindowedStream` in ``self._stream``: the epoch's batches arranged for the ranks as sizes over the stream
    (elastic segments included), iterated through the base class's ``_on_demand`` hook."""

    _lazy: tuple | None = None

    def _size_plan(self) -> SizePlan:
        """The arranged plan (batch sizes over the epoch's stream) of the current epoch and world size, after any
        elastic segments; a ``PlanWarning`` names what it drops."""
        key = (self.epoch, self._segments, self.world_size)
        if self._lazy is None or self._lazy[0] != key:
            t = self._stream.tables(self.epoch)

            def first(w: int) -> SizePlan:
                return even_out_sizes(SizePlan(0, t["sizes"], dict(t["dropped"])), w, self.drop_last)

            plan = arrange_sizes(first, self._segments, self.world_size, self.drop_last)
            self._lazy = (key, plan)
            self._announce(self.epoch, plan.dropped, {})
        return self._lazy[1]

    def global_plan(self) -> Plan:
        """The arranged global plan of the current epoch (materialised; windowed plans only when small)."""
        if not self.windowed:
            return super().global_plan()
        return self._stream.materialise(self.epoch, self._size_plan())

    def _on_demand(self):
        if not self.windowed:
            return None
        plan, epoch = self._size_plan(), self.epoch
        return plan.num_batches, lambda b: self._stream.rows(epoch, *plan.span(b))
