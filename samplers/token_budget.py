"""Token-budget batches: as many rows as fit ``len(batch) * max(length) <= max_tokens``.

Rows are shuffled, cut into chunks of ``sort_window`` rows, each chunk sorted by length, then cut greedily
under the budget, and the batch order shuffled: random batch-mates each epoch, yet little padding (the
"random yet tight" technique of DESIGN.md). ``sort_window=1`` gives plain random order.

Above ``EXACT_MAX_ROWS`` rows the plan is *windowed* (``native.windows``), so a billion rows cost memory per
batch, not per row: rows are grouped in blocks of ``BLOCK_ROWS`` contiguous rows, the blocks permuted by a
stateless Feistel permutation, and each window of ``WINDOW_ROWS`` rows (a contiguous range of that block
permutation) shuffled, sorted in ``sort_window`` chunks and cut on its own; the batches of all windows are then
dealt in a random order. A counting pass over the lengths (parallel over windows, reading them through the
memory map almost sequentially) gives every window's batch sizes once per epoch; a batch's rows are computed
when it is yielded, from its window alone. The plan differs from the exact one only in that cuts restart at
window boundaries and batch-mates come from one window; ``benchmarks/bench_scale.py`` shows padding and mixing
are unchanged within noise. Samplers of one process over the same lengths (same digest, options, seed and epoch)
share a counting pass, so building a second one to resume costs no second pass.
"""

from __future__ import annotations

from typing import cast

import numpy as np
from numpy.typing import ArrayLike

from collections import OrderedDict

from native.batching import budget_cuts
from native.feistel import feistel_range, mix_prefix
from native.rng import permutation
from native.windows import window_batches, window_sizes
from samplers.base import (BatchSamplerBase, Plan, PlanStats, check_budget, check_lengths, digest_array,
                           take_batches)
from samplers.plan_cache import PlanCache, check_window, source_id
from samplers.lazy_plan import SizePlan, arrange_sizes, check_lengths_chunked, count_above, even_out_sizes

__all__ = ["BLOCK_ROWS", "EXACT_MAX_ROWS", "TokenBudgetBatchSampler", "WINDOW_ROWS"]

#: Up to this many rows the plan is exact (one permutation, sorted chunks, one cut over the epoch: the plans of
#: earlier versions); above, it is windowed. 2**22 rows: the exact plan's ~64 B/row peak stays ~256 MiB and its
#: rebuild on resume a few seconds (at 1e7 rows it took 19 s on a loaded 2-core machine).
EXACT_MAX_ROWS = 1 << 22
#: Rows planned together in the windowed plan (at least 16 sort windows).
WINDOW_ROWS = 1 << 16
#: Contiguous rows moved together by the windowed plan's block permutation (one 64-byte line of int32 lengths).
BLOCK_ROWS = 16
#: Windows per call of the counting kernel (bounds its temporaries to ~``64 * WINDOW_ROWS * 4`` bytes).
_COUNT_WINDOWS = 64
#: ``global_plan()`` refuses to materialise a windowed plan of more rows than this.
MAX_PLAN_ROWS = 1 << 28
#: Counting passes shared by the samplers of one process and, for memory-mapped lengths, kept on disk (a resume
#: builds a second sampler over the same lengths, often in a fresh process): (lengths digest, options, seed, epoch)
#: -> tables. The tables are read-only.
_PASSES = PlanCache("token_budget")
#: Validation scans of memory-mapped lengths (whole-file passes), kept the same way.
_SCANS = PlanCache("token_budget_scan", keep=8)


class TokenBudgetBatchSampler(BatchSamplerBase):
    """Batches whose padded size ``len(batch) * max(length)`` stays within ``max_tokens``.

    Up to :data:`EXACT_MAX_ROWS` rows the epoch is planned whole (as before); above, window by window (see the
    module docstring): ``lengths`` may then be a memory-mapped int32 array of 1e9 rows, validated in chunks and
    never copied, and a rank holds a few int64 per batch (1e9 rows: ~240 MiB). Both plans resume elastically.

    Args:
        lengths: int array ``[N]`` of token counts per row (``ArrowDataset.index["length"]``).
        max_tokens: padded token budget per batch.
        max_rows: optional cap on rows per batch.
        sort_window: rows sorted together before cutting (``>= 1``); larger means less padding, less mixing.
        shuffle: shuffle rows and batches each epoch (else rows in index order, cut in order).
        seed, rank, world_size, drop_last: as in every sampler. Rows longer than ``max_tokens`` are dropped
            and counted under ``dropped["longer_than_max_tokens"]``, with a ``PlanWarning`` (set
            ``on_long="error"`` or ``strict=True`` to raise instead).
    """

    def __init__(self, lengths: ArrayLike, max_tokens: int, *, max_rows: int | None = None, sort_window: int = 1024,
                 shuffle: bool = True, on_long: str = "drop", seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, drop_last: bool = False, strict: bool = False) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size, drop_last=drop_last, strict=strict)
        self.windowed = len(lengths) > EXACT_MAX_ROWS
        self.lengths = self._checked_windowed(lengths) if self.windowed else check_lengths(lengths)
        if not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1 (got {max_tokens=})")
        if sort_window < 1:
            raise ValueError(f"sort_window must be >= 1 (got {sort_window=})")
        if on_long not in ("drop", "error"):
            raise ValueError(f"on_long must be 'drop' or 'error' (got {on_long=})")
        if max_rows is not None and (not isinstance(max_rows, (int, np.integer)) or max_rows < 1):
            raise ValueError(f"max_rows must be an integer >= 1 or None (got {max_rows=})")
        check_budget(self.lengths, max_tokens, "max_tokens")
        self.max_tokens = int(max_tokens)
        self.max_rows = None if max_rows is None else int(max_rows)
        self.sort_window = int(sort_window)
        self.shuffle = bool(shuffle)
        self.num_rows = len(self.lengths)
        if self.windowed:
            self._init_windowed(on_long, strict)
            return
        too_long = np.flatnonzero(self.lengths > self.max_tokens)
        if len(too_long) and on_long == "error":
            raise ValueError(
                f"row {int(too_long[0])} has length {int(self.lengths[too_long[0]])} > max_tokens={max_tokens} "
                f"({len(too_long)} rows in all); raise max_tokens or use on_long='drop'"
            )
        if len(too_long) and strict:
            raise ValueError(
                f"{len(too_long)} rows are longer than max_tokens={max_tokens} (first: row {int(too_long[0])}, "
                f"{int(self.lengths[too_long[0]])} tokens) and would be dropped (strict=True); raise max_tokens")
        self._keep = np.flatnonzero(self.lengths <= self.max_tokens)
        if not drop_last and 0 < len(self._keep) < self.world_size:
            raise ValueError(f"world_size={self.world_size} is larger than the {len(self._keep)} usable rows")

    def _checked_windowed(self, lengths) -> np.ndarray:
        """``lengths`` validated in chunks (once per file: the result is cached like the counting passes)."""
        arr = np.asarray(lengths)
        if arr.ndim == 1 and arr.dtype.kind in "iu":
            self._digest = (len(arr), str(arr.dtype), digest_array(arr), source_id(lengths))
            _SCANS.memo(("valid", self._digest), lengths, lambda: {"rows": len(check_lengths_chunked(arr))})
            return arr
        arr = check_lengths_chunked(arr)
        self._digest = (len(arr), str(arr.dtype), digest_array(arr), source_id(arr))
        return arr

    def _init_windowed(self, on_long: str, strict: bool) -> None:
        above = _SCANS.memo(("above", self._digest, self.max_tokens), self.lengths,
                            lambda: dict(zip(("count", "first"), count_above(self.lengths, self.max_tokens))))
        count, first = int(above["count"]), int(above["first"])
        if count and (on_long == "error" or strict):
            why = "use on_long='drop'" if on_long == "error" else "(strict=True)"
            raise ValueError(f"row {first} has length {int(self.lengths[first])} > max_tokens={self.max_tokens} "
                             f"({count} rows in all); raise max_tokens or {why}")
        usable = self.num_rows - count
        if not self.drop_last and 0 < usable < self.world_size:
            raise ValueError(f"world_size={self.world_size} is larger than the {usable} usable rows")
        self._block = BLOCK_ROWS
        self._per_window = max(1, max(WINDOW_ROWS, 16 * self.sort_window) // BLOCK_ROWS)
        self._window_rows = self._per_window * self._block
        self._num_windows = -(-self.num_rows // self._window_rows)
        self._epoch_tables: OrderedDict = OrderedDict()  # epoch -> tables (the last two epochs)
        self._windows: OrderedDict = OrderedDict()  # (epoch, window) -> (rows, offsets) (the last four)
        self._lazy: tuple | None = None
        self._tables(self.epoch)  # the counting pass of the first epoch, up front (or another sampler's)

    def _options(self) -> dict:
        out = {"max_tokens": self.max_tokens, "max_rows": self.max_rows, "sort_window": self.sort_window,
               "shuffle": self.shuffle}
        if self.windowed:
            out.update(plan="windowed", window_rows=self._window_rows, block_rows=self._block)
        return out

    def _metadata(self) -> dict:
        return {"rows": self.num_rows, "lengths": digest_array(self.lengths)}

    def _lost_share(self, plan: Plan | None) -> str:
        if plan is None:
            return ""
        total = float(self.lengths.sum())
        return f" ({1 - float(self.lengths[plan.indices].sum()) / total:.1%} of tokens)" if total else ""

    def _build_plan(self, epoch: int) -> Plan:
        if self.windowed:
            return self._materialise(epoch, SizePlan(0, self._tables(epoch)["sizes"]), self._tables(epoch)["dropped"])
        rows = self._keep
        seed = self.epoch_seed(epoch)
        if self.shuffle:
            rows = rows[permutation(len(rows), seed)]
        if self.sort_window > 1:
            # sort within windows of the shuffled order (stable: ties keep the shuffled order)
            w = self.sort_window
            win = np.arange(len(rows)) // w
            rows = rows[np.lexsort((self.lengths[rows], win))]
        cuts = budget_cuts(self.lengths[rows], self.max_tokens, self.max_rows)
        plan = Plan(rows.astype(np.int64), cuts)
        if self.shuffle:
            plan = take_batches(plan, permutation(plan.num_batches, self.epoch_seed(epoch, 1)))
        dropped = self.num_rows - len(self._keep)
        if dropped:
            plan.dropped["longer_than_max_tokens"] = int(dropped)
        return plan

    # ---- windowed plans (above EXACT_MAX_ROWS) -------------------------------------------------------------
    def _window_kw(self, epoch: int) -> dict:
        return dict(block=self._block, per_window=self._per_window, permute=self.shuffle,
                    block_seed=self.epoch_seed(epoch, 0xB10C), prefix=mix_prefix(self.epoch_seed(epoch, 0x5107)),
                    sort_window=self.sort_window, max_tokens=self.max_tokens, max_rows=self.max_rows)

    def _tables(self, epoch: int) -> dict:
        """The counting pass of an epoch: batch sizes in plan order, where each plan batch lives, totals (shared
        by the samplers of this process, and kept on disk for a memory-mapped ``lengths``: see
        :mod:`samplers.plan_cache`)."""
        if epoch in self._epoch_tables:
            self._epoch_tables.move_to_end(epoch)
            return self._epoch_tables[epoch]
        key = (self._digest, repr(self._options()), self.seed, epoch)
        tables = _PASSES.memo(key, self.lengths, lambda: self._count(epoch))
        self._epoch_tables[epoch] = tables
        while len(self._epoch_tables) > 2:
            self._epoch_tables.popitem(last=False)
        return tables

    def _count(self, epoch: int) -> dict:
        kw = self._window_kw(epoch)
        parts, totals = [], np.zeros(3, dtype=np.int64)
        for w0 in range(0, self._num_windows, _COUNT_WINDOWS):
            sizes, st = window_sizes(self.lengths, w0, min(self._num_windows, w0 + _COUNT_WINDOWS), **kw)
            parts.extend(sizes)
            totals += st.sum(axis=0)
        counts = np.array([len(p) for p in parts], dtype=np.int64)
        wcum = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=wcum[1:])
        by_window = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
        nb = len(by_window)
        # plan batch g is window-order batch order[g]: the batches of all windows in a random order
        order = feistel_range(0, nb, nb, self.epoch_seed(epoch, 0xBA7C)) if self.shuffle and nb else None
        sizes = by_window.astype(np.int64) if order is None else by_window[order].astype(np.int64)
        voff = np.zeros(nb + 1, dtype=np.int64)
        np.cumsum(sizes, out=voff[1:])
        dropped = {"longer_than_max_tokens": int(totals[0])} if totals[0] else {}
        return {"order": order, "wcum": wcum, "by_window": by_window, "sizes": sizes, "voff": voff,
                "dropped": dropped, "tokens": int(totals[1]), "padded": int(totals[2])}

    def _window(self, epoch: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        key = (epoch, w)
        if key not in self._windows:
            self._windows[key] = rows, off = window_batches(self.lengths, w, **self._window_kw(epoch))
            t = self._tables(epoch)
            check_window(t, w, np.diff(off), t["by_window"], t["wcum"], lambda: self._forget(epoch))
            while len(self._windows) > 4:
                self._windows.popitem(last=False)
        return self._windows[key]

    def _forget(self, epoch: int) -> None:
        _PASSES.forget((self._digest, repr(self._options()), self.seed, epoch), self.lengths)
        self._epoch_tables.pop(epoch, None)

    def _rows(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Rows at positions ``[start, stop)`` of the epoch's stream (plan batches one after another); a batch
        of the arranged plan never spans two plan batches (an elastic split only halves a batch)."""
        t = self._tables(epoch)
        g = int(np.searchsorted(t["voff"], start, side="right")) - 1
        wid = g if t["order"] is None else int(t["order"][g])
        w = int(np.searchsorted(t["wcum"], wid, side="right")) - 1
        rows, off = self._window(epoch, w)
        local = wid - int(t["wcum"][w])
        a = int(off[local]) + start - int(t["voff"][g])
        return rows[a : a + stop - start].copy()

    def _materialise(self, epoch: int, plan: SizePlan, dropped: dict) -> Plan:
        if plan.rows > MAX_PLAN_ROWS:
            raise ValueError(f"global_plan() would materialise {plan.rows} rows (> {MAX_PLAN_ROWS}); iterate the "
                             "sampler instead, it computes batches on demand")
        t = self._tables(epoch)
        starts = plan.base + plan.offsets[:-1]
        g = np.searchsorted(t["voff"], starts, side="right") - 1
        wid = g if t["order"] is None else t["order"][g]
        win = np.searchsorted(t["wcum"], wid, side="right") - 1
        rows = np.empty(plan.rows, dtype=np.int64)
        by_window = np.argsort(win, kind="stable")
        bounds = np.searchsorted(win[by_window], np.unique(win), side="right") if len(win) else []
        kw = self._window_kw(epoch)
        lo = 0
        for hi in bounds:  # each window planned once, its batches put in place
            sel = by_window[lo:hi]
            w = int(win[sel[0]])
            wrows, off = window_batches(self.lengths, w, **kw)
            check_window(t, w, np.diff(off), t["by_window"], t["wcum"], lambda: self._forget(epoch))
            for b in sel.tolist():
                a = int(off[wid[b] - t["wcum"][w]]) + int(starts[b] - t["voff"][g[b]])
                rows[plan.offsets[b] : plan.offsets[b + 1]] = wrows[a : a + int(plan.sizes[b])]
            lo = hi
        return Plan(rows, plan.offsets.copy(), dropped=dict(dropped))

    def _size_plan(self) -> SizePlan:
        key = (self.epoch, self._segments, self.world_size)
        if self._lazy is None or self._lazy[0] != key:
            t = self._tables(self.epoch)

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
        plan = self._size_plan()
        return self._materialise(self.epoch, plan, plan.dropped)

    def _on_demand(self):
        if not self.windowed:
            return None
        plan, epoch = self._size_plan(), self.epoch
        return plan.num_batches, lambda b: self._rows(epoch, *plan.span(b))

    def stats(self) -> PlanStats:
        if self.windowed:
            return self._windowed_stats()
        out: dict = dict(super().stats())
        plan = self.global_plan()
        real, padded = (int(x) for x in plan.padding(self.lengths))
        out.update(
            tokens=real,
            padded_tokens=padded,
            padding_fraction=1.0 - real / padded if padded else 0.0,
            mean_tokens_per_batch=real / plan.num_batches if plan.num_batches else 0.0,
        )
        return cast(PlanStats, out)

    def _windowed_stats(self) -> PlanStats:
        """Statistics of a windowed plan from the counting pass (padding of the plan before an elastic split)."""
        plan, t = self._size_plan(), self._tables(self.epoch)
        sizes = plan.sizes
        real, padded = t["tokens"], t["padded"]
        nb = plan.num_batches
        return cast(PlanStats, {
            **self._shared_stats(sizes, plan.rows, plan.dropped, {}),
            "tokens": real,
            "padded_tokens": padded,
            "padding_fraction": 1.0 - real / padded if padded else 0.0,
            "mean_tokens_per_batch": real / nb if nb else 0.0,
            "plan": "windowed",
            "window_rows": self._window_rows,
        })
