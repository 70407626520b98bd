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

from native.feistel import mix_prefix
from native.rng import permutation
from native.sorted_cuts import sorted_cuts
from native.windows import window_batches, window_sizes
from samplers.base import (BatchSamplerBase, Plan, PlanStats, check_budget, check_lengths, digest_array,
                           take_batches)
from samplers.lazy_plan import SizePlan, check_lengths_chunked, count_above
from samplers.plan_cache import PlanCache, source_id
from samplers.windowed import DEAL_SALT, MAX_PLAN_ROWS, WindowedPlan, WindowedStream

__all__ = ["BLOCK_ROWS", "EXACT_MAX_ROWS", "MAX_PLAN_ROWS", "TokenBudgetBatchSampler", "WINDOW_ROWS"]

#: Up to this many rows the plan is exact (one permutation, sorted chunks, one cut over the epoch: the plans of
#: earlier versions); above, it is windowed. 2**22 rows: the exact plan's ~64 B/row peak stays ~256 MiB and its
#: rebuild on resume a few seconds (at 1e7 rows it took 19 s on a loaded 2-core machine).
EXACT_MAX_ROWS = 1 << 22
#: Rows planned together in the windowed plan (at least 16 sort windows).
WINDOW_ROWS = 1 << 16
#: Contiguous rows moved together by the windowed plan's block permutation (one 64-byte line of int32 lengths).
BLOCK_ROWS = 16
#: Counting passes shared by the samplers of one process and, for memory-mapped lengths, kept on disk (a resume
#: builds a second sampler over the same lengths, often in a fresh process): (lengths digest, options, seed, epoch)
#: -> tables. The tables are read-only.
_PASSES = PlanCache("token_budget")
#: Validation scans of memory-mapped lengths (whole-file passes), kept the same way.
_SCANS = PlanCache("token_budget_scan", keep=8)


class TokenBudgetBatchSampler(WindowedPlan, BatchSamplerBase):
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
        self._stream = WindowedStream(
            self.lengths, _PASSES, lambda epoch: (self._digest, repr(self._options()), self.seed, epoch),
            self._num_windows, lambda w0, w1, epoch: window_sizes(self.lengths, w0, w1, **self._window_kw(epoch)),
            lambda w, epoch: window_batches(self.lengths, w, **self._window_kw(epoch)),
            lambda epoch: self.epoch_seed(epoch, DEAL_SALT) if self.shuffle else None, _dropped)
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
            t = self._tables(epoch)
            return self._stream.materialise(epoch, SizePlan(0, t["sizes"], dict(t["dropped"])))
        rows = self._keep
        if self.shuffle:
            rows = rows[permutation(len(rows), self.epoch_seed(epoch))]
        # sort within windows of the shuffled order (stable: ties keep the shuffled order), cut under the budget
        _, rows, cuts, _ = sorted_cuts(self.lengths[rows], rows, budget=self.max_tokens,
                                       chunk_rows=self.sort_window, caps=self.max_rows)
        plan = Plan(rows, cuts)
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
        """The counting pass of an epoch (see :class:`samplers.windowed.WindowedStream`), with the token totals."""
        t = self._stream.tables(epoch)
        if "tokens" not in t:
            st = t["window_stats"]
            t["tokens"] = int(st[:, 1].sum()) if len(st) else 0
            t["padded"] = int(st[:, 2].sum()) if len(st) else 0
        return t

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


def _dropped(window_stats: np.ndarray) -> dict:
    n = int(window_stats[:, 0].sum()) if len(window_stats) else 0
    return {"longer_than_max_tokens": n} if n else {}
