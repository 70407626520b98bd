"""Random (or sequential) fixed-size batches, planned lazily: a billion rows cost megabytes per rank.

The epoch is a *stream* of row positions cut into batches of ``batch_size`` (``native.batching.fixed_sizes``):
global batch ``b`` holds stream positions ``[offsets[b], offsets[b + 1])`` and goes to rank ``b % world_size``.
Only the batch sizes are kept (:mod:`samplers.lazy_plan`, 8 B per batch); a batch's rows are computed when it is
yielded, so the first batch, a resume and an elastic resume cost O(batches), never O(rows).

Stream position -> row, per ``shuffle``:

* ``False``: the position itself (rows in order).
* ``True`` / ``"global"``: a seeded permutation of all rows. Up to ``EXACT_MAX_ROWS`` rows it is the
  Fisher-Yates permutation ``native.rng.permutation`` (the plan of datapipe <= 0.2, kept bit for bit, 8 B/row
  while the epoch runs); above, the stateless Feistel permutation ``native.feistel`` (no memory: any position in
  O(1)).
* ``"shard_local"``: Mosaic streaming's ``py1b`` shuffle, stateless: the shards (``shard_offsets``, e.g. an
  ``ArrowDataset``'s shard row offsets) are permuted, cut into windows of ``shard_window`` consecutive shards, and
  the rows of each window permuted among themselves (``native.feistel.shard_window_rows``). A batch touches the
  shards of one window (two at a window boundary), so a remote dataset reads ``shard_window`` shards at a time;
  the cost is less mixing (rows of one window share batches), measured in ``benchmarks/bench_scale.py``.
"""

from __future__ import annotations

from typing import cast

import numpy as np
from numpy.typing import ArrayLike, NDArray

from native.batching import fixed_sizes
from native.feistel import feistel_range, mix_prefix, shard_window_rows
from native.rng import permutation
from samplers.base import BatchSamplerBase, Plan, PlanStats, digest_array
from samplers.lazy_plan import SizePlan, arrange_sizes

__all__ = ["EXACT_MAX_ROWS", "RandomBatchSampler"]

#: Up to this many rows a global shuffle is the materialised Fisher-Yates permutation (the plans of earlier
#: versions, unchanged); above it the stateless Feistel permutation (no per-row memory). 2**24 rows = 128 MiB.
EXACT_MAX_ROWS = 1 << 24
#: ``global_plan()`` refuses to materialise more rows than this (2 GiB); iterating never materialises.
MAX_PLAN_ROWS = 1 << 28


class RandomBatchSampler(BatchSamplerBase):
    """Batches of ``batch_size`` rows of a shuffled (or ordered) ``range(num_rows)``, sharded over ranks.

    Without ``drop_last`` every row appears exactly once per epoch across ranks; when the rows do not fill
    ``world_size`` full batches at the last step, the last batches are shortened (each keeps >= 1 row) so every
    rank yields the same number of batches (when even that is impossible, e.g. 3 rows in batches of 1 over 2
    ranks, the rows past the last whole step are dropped and counted). With ``drop_last`` every batch is full and
    the remainder is dropped and counted (``stats()["dropped"]["incomplete_batch"]``).

    Memory is O(batches) per rank (8 B per global batch), whatever ``num_rows``: ``RandomBatchSampler(10**9,
    1024, world_size=8)`` holds ~8 MB (benchmarks/results/bench_scale.md). A state saved at another world size
    resumes here (elastic): the rows the old ranks had not received are dealt to the new ones.

    Args:
        num_rows: rows in the dataset.
        batch_size: rows per batch, ``>= 1``.
        shuffle: ``True``/``"global"`` permute all rows each epoch (seeded by ``seed`` and the epoch; Fisher-Yates
            up to :data:`EXACT_MAX_ROWS` rows, Feistel above); ``"shard_local"`` permute within windows of
            ``shard_window`` shards (needs ``shard_offsets``); ``False`` rows in order.
        shard_offsets: int64 ``[S + 1]`` first row of each shard and ``num_rows`` (``"shard_local"`` only).
        shard_window: shards whose rows are shuffled together (``"shard_local"`` only), ``>= 1``.
        seed: integer seed, the same on every rank.
        rank, world_size: this process's rank; default to torch.distributed, else 0 and 1.
        drop_last: drop the rows that do not fill a full step of ``world_size`` batches.
        strict: raise ``ValueError`` instead of a ``PlanWarning`` when the plan drops rows unasked.
    """

    def __init__(self, num_rows: int, batch_size: int, *, shuffle: bool | str = True,
                 shard_offsets: ArrayLike | None = None, shard_window: int = 8, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, drop_last: bool = False,
                 strict: bool = False) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size, drop_last=drop_last, strict=strict)
        if not isinstance(num_rows, (int, np.integer)) or num_rows < 0:
            raise ValueError(f"num_rows must be an integer >= 0 (got {num_rows=})")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1 (got {batch_size=})")
        if not drop_last and 0 < num_rows < self.world_size:
            raise ValueError(
                f"world_size={self.world_size} is larger than num_rows={num_rows}: some rank would get no rows; "
                "use fewer ranks or more data"
            )
        if isinstance(shuffle, (bool, int, np.bool_, np.integer)):
            shuffle = bool(shuffle)
        elif shuffle not in ("global", "shard_local"):
            raise ValueError(f"shuffle must be True, False, 'global' or 'shard_local' (got {shuffle=})")
        self.num_rows = int(num_rows)
        self.batch_size = int(batch_size)
        self.shuffle: bool | str = True if shuffle == "global" else shuffle
        self.shard_offsets: NDArray[np.int64] | None = None
        self.shard_window = int(shard_window)
        if self.shuffle == "shard_local":
            self.shard_offsets = self._check_shards(shard_offsets, shard_window)
        elif shard_offsets is not None:
            raise ValueError("shard_offsets is only used with shuffle='shard_local' (got shuffle="
                             f"{shuffle!r}); pass shuffle='shard_local' or drop shard_offsets")
        self._lazy: tuple | None = None  # ((epoch, segments, world_size), SizePlan)
        self._order: tuple[int, NDArray[np.int64]] | None = None  # (epoch, Fisher-Yates permutation) small n

    def _check_shards(self, shard_offsets, shard_window) -> NDArray[np.int64]:
        if shard_offsets is None:
            raise ValueError("shuffle='shard_local' needs shard_offsets (int64 [S + 1] first row of each shard, "
                             "then num_rows), e.g. from the dataset's shard row counts")
        if not isinstance(shard_window, (int, np.integer)) or shard_window < 1:
            raise ValueError(f"shard_window must be an integer >= 1 (got {shard_window=})")
        off = np.asarray(shard_offsets)
        if off.ndim != 1 or len(off) < 2 or off.dtype.kind not in "iu":
            raise ValueError(f"shard_offsets must be 1-D integers [S + 1] (got shape {off.shape}, dtype {off.dtype})")
        off = off.astype(np.int64)
        bad = np.flatnonzero(np.diff(off) < 0)
        if off[0] != 0 or off[-1] != self.num_rows or len(bad):
            where = f"; it decreases at shard {int(bad[0])}" if len(bad) else ""
            raise ValueError(f"shard_offsets must rise from 0 to num_rows={self.num_rows} (got first {int(off[0])}, "
                             f"last {int(off[-1])}{where})")
        return off

    def _options(self) -> dict:
        out = {"num_rows": self.num_rows, "batch_size": self.batch_size, "shuffle": self.shuffle}
        if self.shuffle == "shard_local":
            out["shard_window"] = self.shard_window
        return out

    def _metadata(self) -> dict:
        return {} if self.shard_offsets is None else {"shard_offsets": digest_array(self.shard_offsets)}

    # ---- the plan: sizes over a stream of positions -------------------------------------------------------
    def _first(self, epoch: int, world_size: int) -> SizePlan:
        """The epoch's global plan for ``world_size`` ranks, as sizes over stream positions ``[0, kept)``."""
        n = self.num_rows
        sizes = fixed_sizes(n, self.batch_size, world_size, self.drop_last)
        kept = int(sizes.sum())
        reason = "incomplete_batch" if self.drop_last else "uneven_tail_too_few_rows_to_split"
        return SizePlan(0, sizes, {reason: n - kept} if kept < n else {})

    def _size_plan(self) -> SizePlan:
        key = (self.epoch, self._segments, self.world_size)
        if self._lazy is None or self._lazy[0] != key:
            plan = arrange_sizes(lambda w: self._first(self.epoch, w), self._segments, self.world_size,
                                 self.drop_last)
            self._lazy = (key, plan)
            self._announce(self.epoch, plan.dropped, {})
        return self._lazy[1]

    def _rows(self, epoch: int, start: int, stop: int) -> NDArray[np.int64]:
        """Rows at stream positions ``[start, stop)`` of ``epoch``: int64 ``[stop - start]``."""
        n = self.num_rows
        if self.shuffle is False:
            return np.arange(start, stop, dtype=np.int64)
        if self.shuffle == "shard_local":
            off = self.shard_offsets
            order = permutation(len(off) - 1, self.epoch_seed(epoch, 0x5A4D))
            return shard_window_rows(start, stop, np.diff(off)[order], off[:-1][order], self.shard_window,
                                     mix_prefix(self.epoch_seed(epoch, 0x5A4D)))
        if n <= EXACT_MAX_ROWS:
            if self._order is None or self._order[0] != epoch:
                self._order = (epoch, permutation(n, self.epoch_seed(epoch)))
            return self._order[1][start:stop]
        return feistel_range(start, stop, n, self.epoch_seed(epoch))

    def _build_plan(self, epoch: int) -> Plan:
        """The materialised global plan (small epochs: ``global_plan()``, tests); iteration never builds it."""
        first = self._first(epoch, self.world_size)
        if first.rows > MAX_PLAN_ROWS:
            raise ValueError(f"global_plan() would materialise {first.rows} rows (> {MAX_PLAN_ROWS}); iterate the "
                             "sampler instead, it computes batches on demand")
        return Plan(self._rows(epoch, 0, first.rows), first.offsets, dropped=first.dropped)

    def global_plan(self) -> Plan:
        """The arranged global plan of the current epoch (every rank's batches, step-major), materialised: for
        small epochs, tests and inspection (refused above ``MAX_PLAN_ROWS`` rows)."""
        plan = self._size_plan()
        if plan.rows > MAX_PLAN_ROWS:
            raise ValueError(f"global_plan() would materialise {plan.rows} rows (> {MAX_PLAN_ROWS}); iterate the "
                             "sampler instead, it computes batches on demand")
        rows = self._rows(self.epoch, plan.base, plan.base + plan.rows)
        return Plan(rows, plan.offsets.copy(), dropped=dict(plan.dropped))

    # ---- iteration ----------------------------------------------------------------------------------------
    def _on_demand(self):
        plan, epoch = self._size_plan(), self.epoch

        def rows_of(b: int) -> NDArray[np.int64]:
            rows = self._rows(epoch, *plan.span(b))
            return rows.copy() if rows.base is not None else rows

        return plan.num_batches, rows_of

    def stats(self) -> PlanStats:
        """Plan statistics of the current epoch over all ranks, from the batch sizes (no rows materialised)."""
        plan = self._size_plan()
        sizes = plan.sizes
        out: dict = {
            "epoch": self.epoch,
            "num_batches": int(plan.num_batches),
            "batches_per_rank": int(plan.num_batches // self.world_size),
            "rows": plan.rows,
            "mean_batch_size": float(sizes.mean()) if len(sizes) else 0.0,
            "min_batch_size": int(sizes.min()) if len(sizes) else 0,
            "max_batch_size": int(sizes.max()) if len(sizes) else 0,
            "dropped_rows": int(sum(plan.dropped.values())),
            "dropped": {k: int(v) for k, v in plan.dropped.items()},
            "repeated": {},
        }
        if self.shuffle == "shard_local":
            out.update(num_shards=len(self.shard_offsets) - 1, shard_window=self.shard_window)
        return cast(PlanStats, out)
