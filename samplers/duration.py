"""Duration-bucketed speech batches with little padding, random within buckets, from the whole epoch's plan.

Implements the batching of "Training and Inference Efficiency of Encoder-Decoder Speech Models" (Żelasko et
al., 2025), after Lhotse's ``DynamicBucketingSampler`` and NeMo's 2D bucketing: cuts go to duration buckets
(or duration x output-token buckets), and a batch comes from one bucket under a *padded* budget
``n * max_len <= max_duration``. Unlike a streaming sampler we hold every duration in memory, so the epoch's
plan is one Numba kernel (``native.duration``): each bucket is shuffled, cut into chunks of a few batches,
each chunk sorted by duration, batches cut under the budget, and the steps shuffled. Batch-mates change every
epoch, yet padding is a fraction of plain bucketing's; every rank gets a batch of the same bucket at each step,
and resuming is O(1) (recompute the plan, skip what was consumed).

Above ``EXACT_MAX_ROWS`` rows (1D or 2D buckets) the plan is *windowed*, so 1e9 memory-mapped durations (and output
lengths) cost memory per batch, not per row: the bins come from an evenly strided sample of ``SAMPLE_ROWS`` durations
(and output lengths); rows are grouped in
blocks of ``BLOCK_ROWS`` contiguous rows, the blocks permuted by a stateless Feistel permutation, and each window
of ``WINDOW_ROWS`` rows (a contiguous range of that block permutation) is shuffled, split by bucket, sorted in
chunks and cut under the budget on its own (``native.duration.duration_window_sizes``/``_batches``; with 2D buckets
each cut's bucket is assigned in its window by the exact plan's rule). A counting
pass (parallel over windows) gives every window's batch sizes and buckets once per epoch; steps of
``world_size`` batches of one bucket are laid out in a seeded random order and a batch's rows are computed from
its window when it is yielded (``samplers.grouped_lazy_plan``: the base's evening-out, step grouping and elastic
re-grouping, on batch parts). The plan differs from the exact one only in that bucket cuts restart at window
boundaries and batch-mates come from one window; ``benchmarks/bench_scale.py`` (1D) and
``benchmarks/bench_duration2d_scale.py`` (2D) compare padding, purity and batch sizes.
The windowed path is :class:`samplers.duration_windowed.WindowedDurationPlan`, a mixin of the sampler.
"""

from __future__ import annotations

from collections.abc import Sequence

from typing import cast

import numpy as np
from numpy.typing import ArrayLike, NDArray

from native.duration import (
    assign_buckets_2d,
    bucket_batches,
    duration_window_batches,
)
from samplers.base import BatchSamplerBase, Plan, PlanStats, check_lengths, digest_array
from samplers.plan_cache import check_window
from samplers.bins import check_durations, estimate_duration_bins, estimate_duration_bins_2d
from samplers.duration_windowed import MIN_CHUNKS, WindowedDurationPlan, cut_cost

__all__ = ["DurationBucketSampler", "estimate_duration_bins", "estimate_duration_bins_2d"]

#: Up to this many rows the plan is exact (the plans of earlier versions, ~74 B/row at peak); above, it is windowed
#: (see the module docstring), with 1D or 2D buckets.
EXACT_MAX_ROWS = 1 << 22
#: Rows planned together in the windowed plan (30 buckets: ~8,700 rows of a bucket per window); with 2D buckets, times
#: the mean number of sub-buckets of a duration bound (so a bucket gets as many rows per window).
WINDOW_ROWS = 1 << 18
#: Contiguous rows moved together by the windowed plan's block permutation (one 64-byte line of float32).
BLOCK_ROWS = 16
#: Durations (evenly strided) the windowed plan estimates its bins from.
SAMPLE_ROWS = 1 << 22
#: ``global_plan()`` refuses to materialise a windowed plan of more rows than this.
MAX_PLAN_ROWS = 1 << 28
# The tunables above are read from this module when they are used (tests and benchmarks set them here) and passed
# to the windowed path, which lives in samplers.duration_windowed with its caches.


class DurationBucketSampler(WindowedDurationPlan, BatchSamplerBase):
    """Batches of cuts from one duration bucket whose padded duration stays within ``max_duration``.

    A batch of ``n`` cuts whose longest lasts ``m`` seconds keeps ``n * cost(m) <= max_duration`` with
    ``cost(m) = m + m**2 / quadratic_duration`` (just ``m`` without the quadratic term), ``n <= max_cuts`` and
    ``n <= bucket_batch_sizes[bucket]`` when given. Steps are shuffled, so buckets come in random order.

    Dropped cuts are counted in ``stats()["discarded"]`` (by reason in ``stats()["dropped"]``), never silent:

    * ``longer_than_max_duration``: ``cost(d) > max_duration`` (``on_long="error"`` raises instead);
    * ``outside_2d_bins``: 2D only, no bucket holds the cut's (duration, tokens) (with ``strict_2d=True``, any
      cut whose tokens exceed its duration bin's sub-buckets; otherwise it is promoted to the next larger
      bucket that holds it, counted in ``stats()["promoted"]`` and ``stats()["promoted_by_reason"]``);
    * ``uneven_tail``: ``drop_last=True`` and a bucket's batches do not fill a last step across ranks;
    * ``uneven_tail_too_few_rows_to_split``: a bucket's batches cannot be split into a multiple of
      ``world_size`` (only when its batches hold one cut each, e.g. cuts near ``max_duration``).

    Durations must be finite and ``> 0`` (NaN, inf, zero or negative raise a ``ValueError`` naming the row).
    A bucket holding fewer cuts than ``world_size`` cannot give every rank a batch at its step; its cuts are
    moved to the next larger bucket and counted in ``stats()["promoted"]`` too.

    Above :data:`EXACT_MAX_ROWS` cuts the plan is windowed (module docstring): ``durations`` (and
    ``output_lengths``) may then be memory-mapped float32 (int32) arrays of 1e9 rows, validated in chunks and
    never copied; the bins (1D or 2D) come from an evenly strided sample of :data:`SAMPLE_ROWS` rows; a rank holds
    ~22 bytes per batch (1e9 cuts of ~7 s: ~2.2e7 batches). ``bucket_of`` is then ``None`` (use
    :meth:`buckets_of`), and small buckets are not merged (a bucket with fewer cuts than ranks drops them, counted);
    2D assignment (``strict_2d``, promotion, ``outside_2d_bins``) follows the exact plan's rule cut by cut.
    Both plans resume elastically with same-bucket steps.

    Args:
        durations: float ``[N]`` seconds per cut (``ArrowDataset.index["duration"]``).
        max_duration: padded budget in seconds per batch; ``None`` only with ``bucket_batch_sizes``.
        num_buckets: duration buckets estimated with :func:`estimate_duration_bins` (ignored with ``bucket_bins``).
        bucket_bins: 1D boundaries ``[K-1]`` (Lhotse's ``duration_bins``) or 2D bins ``[K, 2]`` of
            ``(max_duration, max_tokens)`` (NeMo's ``bucket_duration_bins``).
        quadratic_duration: ``q`` of the quadratic cost (seconds), or ``None``.
        max_cuts: cap on cuts per batch.
        output_lengths: int ``[N]`` output tokens per cut: turns on 2D buckets.
        num_sub_buckets: token sub-buckets per duration bucket when 2D bins are estimated.
        bucket_batch_sizes: per-bucket batch size caps ``[K]`` (e.g. from :func:`calibrate_batch_sizes`).
        strict_2d: drop (rather than promote) cuts whose tokens exceed their duration bin's sub-buckets.
        chunk_batches: batches' worth of cuts sorted together inside a bucket (at most a quarter of the bucket,
            so batch-mates change between epochs); ``0`` turns the sorting off (plain bucketing). Larger: less
            padding, fewer distinct batch-mates.
        on_long: ``"drop"`` (count) or ``"error"`` for cuts over the budget.
        shuffle: shuffle buckets and steps each epoch (else cuts in index order, buckets in order).
        seed, rank, world_size, drop_last: as in every sampler.

    Example:
        >>> ds = ArrowDataset.open("librispeech")                                      # doctest: +SKIP
        >>> sampler = DurationBucketSampler(ds.index["duration"], max_duration=600, num_buckets=30)
        >>> loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_features)  # doctest: +SKIP
    """


    def __init__(self, durations: ArrayLike, max_duration: float | None = None, *, num_buckets: int = 30,
                 bucket_bins: ArrayLike | None = None, quadratic_duration: float | None = None,
                 max_cuts: int | None = None, output_lengths: ArrayLike | None = None, num_sub_buckets: int = 2,
                 bucket_batch_sizes: Sequence[int] | None = None, strict_2d: bool = False,
                 chunk_batches: int = 16, on_long: str = "drop", shuffle: bool = True, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, drop_last: bool = False,
                 strict: bool = False) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size, drop_last=drop_last, strict=strict)
        self.windowed = np.ndim(durations) == 1 and len(durations) > EXACT_MAX_ROWS
        if self.windowed:
            self._init_windowed_durations(durations, sample_rows=SAMPLE_ROWS)
        else:
            self.durations = check_durations(durations)
        n = self.num_rows = len(self.durations)
        if max_duration is None and bucket_batch_sizes is None:
            raise ValueError("max_duration must be given (seconds per padded batch) unless bucket_batch_sizes is")
        if max_duration is not None and not (isinstance(max_duration, (int, float, np.number)) and max_duration > 0):
            raise ValueError(f"max_duration must be a number > 0 (got {max_duration=})")
        if quadratic_duration is not None and not quadratic_duration > 0:
            raise ValueError(f"quadratic_duration must be > 0 seconds or None (got {quadratic_duration=})")
        if max_cuts is not None and (not isinstance(max_cuts, (int, np.integer)) or max_cuts < 1):
            raise ValueError(f"max_cuts must be an integer >= 1 or None (got {max_cuts=})")
        if not isinstance(chunk_batches, (int, np.integer)) or chunk_batches < 0:
            raise ValueError(f"chunk_batches must be an integer >= 0 (got {chunk_batches=})")
        if on_long not in ("drop", "error"):
            raise ValueError(f"on_long must be 'drop' or 'error' (got {on_long=})")
        self.max_duration = float("inf") if max_duration is None else float(max_duration)
        self.quadratic_duration = None if quadratic_duration is None else float(quadratic_duration)
        self.max_cuts = max_cuts
        self.chunk_batches = int(chunk_batches)
        self.shuffle = bool(shuffle)
        self.strict_2d = bool(strict_2d)
        if output_lengths is None:
            self.output_lengths = None
        elif self.windowed:  # read in place (a memory map stays one), like the durations
            self.output_lengths = self._init_windowed_lengths(output_lengths)
        else:
            self.output_lengths = check_lengths(output_lengths, "output_lengths", n)
        self.bins = self._resolve_bins(bucket_bins, num_buckets, num_sub_buckets)
        self.is_2d = self.bins.ndim == 2
        self.num_buckets = len(self.bins) if self.is_2d else len(self.bins) + 1
        self._bucket_batch_sizes = None if bucket_batch_sizes is None else [int(x) for x in bucket_batch_sizes]
        if self.windowed:
            self._init_windowed(on_long, bucket_batch_sizes, window_rows=WINDOW_ROWS, block_rows=BLOCK_ROWS)
            return

        # which cuts are usable, and where they go
        cost = cut_cost(self.durations, self.quadratic_duration)
        too_long = cost > self.max_duration
        if too_long.any() and on_long == "error":
            i = int(np.flatnonzero(too_long)[0])
            raise ValueError(
                f"cut {i} lasts {self.durations[i]:.3f} s, over max_duration={max_duration} "
                f"({int(too_long.sum())} cuts in all); raise max_duration or use on_long='drop'"
            )
        self.dropped_static: dict[str, int] = {}
        if too_long.any():
            self.dropped_static["longer_than_max_duration"] = int(too_long.sum())
        if self.is_2d:
            bucket, promoted = assign_buckets_2d(self.durations, self.output_lengths, self.bins, self.strict_2d)
            outside = (bucket < 0) & ~too_long
            if outside.any():
                self.dropped_static["outside_2d_bins"] = int(outside.sum())
            self.promoted = {"to_fit_2d_bins": int((promoted & ~too_long).sum())}
        else:
            bucket = np.searchsorted(self.bins, self.durations, side="left").astype(np.int64)
            self.promoted = {"to_fit_2d_bins": 0}
        bucket[too_long] = -1
        if strict and self.dropped_static:
            raise ValueError(f"the plan would drop {sum(self.dropped_static.values())} cuts "
                             f"({self.dropped_static}; strict=True): raise max_duration or widen the bins")
        self._bucket_raw = bucket  # before small buckets are merged: that depends on the world size
        self._cost = cost
        self._caps = self._resolve_caps(bucket_batch_sizes)
        self._layouts: dict[int, tuple] = {}
        self.bucket_of, self._rows, self._bucket_offsets, self._chunk_rows, moved = self._layout(self.world_size)
        self.promoted["from_small_bucket"] = moved
        kept = self._rows
        if not drop_last and 0 < len(kept) < self.world_size:
            raise ValueError(f"world_size={self.world_size} is larger than the {len(kept)} usable cuts")
        self.options = (f"max_duration={self.max_duration!r};q={self.quadratic_duration!r};max_cuts={max_cuts};"
                        f"buckets={self.num_buckets};2d={self.is_2d};chunk={self.chunk_batches};"
                        f"shuffle={self.shuffle}")

    # ---- set-up helpers -----------------------------------------------------------------------------------
    def _resolve_bins(self, bucket_bins, num_buckets, num_sub_buckets) -> NDArray[np.float64]:
        if bucket_bins is None:
            if not isinstance(num_buckets, (int, np.integer)) or num_buckets < 1:
                raise ValueError(f"num_buckets must be an integer >= 1 (got {num_buckets=})")
            k = min(int(num_buckets), max(1, self.num_rows))
            if self.num_rows == 0:
                return np.zeros((0, 2) if self.output_lengths is not None else 0, np.float64)
            if self.output_lengths is not None and self.windowed:  # the same strided sample of both arrays
                return self._memo(("bins_2d", k, num_sub_buckets, SAMPLE_ROWS, self._tok_digest),
                                  lambda: estimate_duration_bins_2d(self._sample(), self._sample_tokens(), k,
                                                                    num_sub_buckets))
            if self.output_lengths is not None:
                return estimate_duration_bins_2d(self.durations, self.output_lengths, k, num_sub_buckets)
            if self.windowed:  # an evenly strided sample stands for the whole
                return self._memo(("bins", k, SAMPLE_ROWS), lambda: estimate_duration_bins(self._sample(), k))
            return estimate_duration_bins(self.durations, k)
        bins = np.asarray(bucket_bins, dtype=np.float64)
        if bins.ndim == 1:
            if not np.all(np.isfinite(bins)) or np.any(np.diff(bins) < 0):
                raise ValueError(f"1D bucket_bins must be finite and non-decreasing (got {bins.tolist()})")
            return bins
        if bins.ndim == 2 and bins.shape[1] == 2 and len(bins):
            if self.output_lengths is None:
                raise ValueError("2D bucket_bins [K, 2] need output_lengths (tokens per cut)")
            order = np.lexsort((bins[:, 1], bins[:, 0]))
            if not np.array_equal(order, np.arange(len(bins))):
                raise ValueError("2D bucket_bins must be sorted by (max_duration, max_tokens)")
            return bins
        raise ValueError(f"bucket_bins must be [K-1] boundaries or [K, 2] (duration, tokens) bins "
                         f"(got shape {bins.shape})")

    def _layout(self, world_size: int) -> tuple:
        """``(bucket_of, rows sorted by bucket, bucket offsets, chunk rows, cuts moved)`` for ``world_size`` ranks
        (cached: an elastic resume plans the rest of an epoch under the old world size)."""
        if world_size not in self._layouts:
            bucket = self._bucket_raw.copy()
            moved = self._merge_small_buckets(bucket, world_size)
            kept = np.flatnonzero(bucket >= 0)
            rows = kept[np.argsort(bucket[kept], kind="stable")].astype(np.int64)
            counts = np.bincount(bucket[kept], minlength=self.num_buckets)
            offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            chunk = self._resolve_chunk_rows(self._cost, counts, bucket)
            self._layouts[world_size] = (bucket, rows, offsets, chunk, moved)
        return self._layouts[world_size]

    def _merge_small_buckets(self, bucket: NDArray[np.int64], world_size: int) -> int:
        """Move the cuts of buckets with fewer than ``world_size`` cuts to the next larger non-empty bucket
        (the last such bucket goes down instead), so every bucket can give each rank a batch."""
        if world_size == 1 or self.drop_last:
            return 0
        counts = np.bincount(bucket[bucket >= 0], minlength=self.num_buckets)
        moved = 0
        for b in range(self.num_buckets):
            if 0 < counts[b] < world_size:
                up = [c for c in range(b + 1, self.num_buckets) if counts[c] > 0]
                down = [c for c in range(b - 1, -1, -1) if counts[c] > 0]
                target = up[0] if up else (down[0] if down else -1)
                if target < 0:
                    break  # one bucket in all: the world-size check reports it
                sel = bucket == b
                bucket[sel] = target
                counts[target] += counts[b]
                moved += int(counts[b])
                counts[b] = 0
        return moved

    def _resolve_caps(self, bucket_batch_sizes) -> NDArray[np.int64]:
        cap = np.iinfo(np.int64).max if self.max_cuts is None else int(self.max_cuts)
        caps = np.full(self.num_buckets, cap, dtype=np.int64)
        if bucket_batch_sizes is not None:
            bbs = np.asarray(bucket_batch_sizes)
            if bbs.shape != (self.num_buckets,) or bbs.dtype.kind not in "iu" or np.any(bbs < 1):
                raise ValueError(
                    f"bucket_batch_sizes must be {self.num_buckets} integers >= 1, one per bucket "
                    f"(got {np.asarray(bucket_batch_sizes).tolist()})"
                )
            caps = np.minimum(caps, bbs.astype(np.int64))
        return caps

    def _resolve_chunk_rows(self, cost: NDArray[np.float64], counts: NDArray[np.int64],
                            bucket_of: NDArray[np.int64]) -> NDArray[np.int64]:
        if self.chunk_batches == 0:
            return np.zeros(self.num_buckets, dtype=np.int64)
        sums = np.bincount(bucket_of[bucket_of >= 0], weights=cost[bucket_of >= 0], minlength=self.num_buckets)
        mean = np.where(counts > 0, sums / np.maximum(counts, 1), 1.0)
        per_batch = np.minimum(np.floor(self.max_duration / mean), self._caps.astype(np.float64))
        rows = self.chunk_batches * np.maximum(per_batch, 1)
        # a chunk as large as its bucket would sort the bucket whole: the same batches every epoch
        rows = np.minimum(rows, np.ceil(counts / MIN_CHUNKS))
        return np.maximum(1, rows).astype(np.int64)

    # ---- plan ---------------------------------------------------------------------------------------------
    def _options(self) -> dict:
        return {"max_duration": self.max_duration, "quadratic_duration": self.quadratic_duration,
                "max_cuts": self.max_cuts, "bins": self.bins.tolist(), "bucket_batch_sizes": self._bucket_batch_sizes,
                "strict_2d": self.strict_2d, "chunk_batches": self.chunk_batches, "shuffle": self.shuffle,
                **({"plan": "windowed", "window_rows": self._window_rows, "block_rows": self._block}
                   if self.windowed else {})}

    def _metadata(self) -> dict:
        out = {"rows": self.num_rows, "durations": digest_array(self.durations)}
        if self.output_lengths is not None:
            out["output_lengths"] = digest_array(self.output_lengths)
        return out

    def _lost_share(self, plan: Plan) -> str:
        if self.windowed:
            t = self._tables(self.epoch)
            total = t["seconds"] + t["dropped_seconds"]
            return f" ({t['dropped_seconds'] / total:.1%} of seconds before evening out)" if total else ""
        total = float(self.durations.sum())
        return f" ({1 - float(self.durations[plan.indices].sum()) / total:.1%} of seconds)" if total else ""

    def _build_plan(self, epoch: int) -> Plan:
        if self.windowed:  # the counted batches window after window (small inputs only: tests, references)
            t = self._tables(epoch)
            if int(t["size"].sum(dtype=np.int64)) > MAX_PLAN_ROWS:
                raise ValueError(f"the windowed plan of {self.num_rows} rows is too large to materialise; iterate "
                                 "the sampler instead")
            kw = self._window_kw(epoch)
            parts = [duration_window_batches(self.durations, w, **kw) for w in range(self._num_windows)]
            for w, part in enumerate(parts):
                check_window(t, w, np.diff(part[1]), t["size"], t["wcum"], lambda: self._forget(epoch))
            idx = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
            sizes = np.concatenate([np.diff(p[1]) for p in parts]) if parts else np.zeros(0, np.int64)
            groups = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int64)
            return Plan.from_sizes(idx, sizes, groups=groups, dropped=dict(t["dropped"]))
        _, rows, offsets, chunk, _ = self._layout(self.world_size)
        idx, off, groups = bucket_batches(rows, offsets, self.durations, chunk, self._caps, self.max_duration,
                                          self.quadratic_duration, self.shuffle, self.epoch_seed(epoch))
        return Plan(idx, off, groups, dict(self.dropped_static))

    def _step_order_kw(self, plan: Plan) -> dict:
        if self.windowed:  # the lazy plan's order, through the same hook
            hook = self._order_steps(self.epoch)
            return {} if hook is None else {"order_steps": hook}
        return {"seed": self.epoch_seed(None, 0x5EED)} if self.shuffle else {}

    @property
    def bucket_shapes(self) -> list:
        """The largest shape of each bucket, for :func:`calibrate_batch_sizes`: ``max_duration`` (1D, the last
        bucket up to the longest usable cut) or ``(max_duration, max_tokens)`` (2D), one per bucket."""
        if self.is_2d:
            return [(float(a), float(b)) for a, b in self.bins]
        if self.windowed:
            top = self._tables(self.epoch)["top"]
        else:
            usable = self.durations[self.bucket_of >= 0]
            top = float(usable.max()) if len(usable) else float(self.bins[-1]) if len(self.bins) else 0.0
        return [float(b) for b in self.bins] + [max(top, float(self.bins[-1]) if len(self.bins) else top)]

    # ---- statistics ---------------------------------------------------------------------------------------
    def stats(self) -> PlanStats:
        """Plan statistics over all ranks: those of every sampler plus ``padding_fraction`` (of the padded
        seconds), ``duration`` / ``padded_duration`` (s), ``batches_per_bucket`` and ``cuts_per_bucket``
        (lists, one per bucket), ``promoted`` (cuts moved to a larger bucket; ``promoted_by_reason`` splits
        it), ``discarded`` (deprecated: the same number as ``dropped_rows``; removed in the next release), ``bins``; in 2D also
        ``token_padding_fraction``. A windowed plan (above ``EXACT_MAX_ROWS``) also gives ``plan`` and
        ``window_rows``, and its seconds, padding (also of tokens) and promotions come from the counting pass."""
        if self.windowed:
            return self._windowed_stats()
        out: dict = dict(super().stats())
        plan = self.global_plan()
        real, padded = plan.padding(self.durations)
        out.update(
            duration=real,
            padded_duration=padded,
            padding_fraction=1.0 - real / padded if padded else 0.0,
            mean_batch_duration=real / plan.num_batches if plan.num_batches else 0.0,
            num_buckets=self.num_buckets,
            batches_per_bucket=np.bincount(plan.groups, minlength=self.num_buckets).tolist(),
            cuts_per_bucket=np.diff(self._bucket_offsets).tolist(),
            promoted=int(sum(self.promoted.values())),
            promoted_by_reason=dict(self.promoted),
            discarded=int(sum(plan.dropped.values())),
            bins=self.bins.tolist(),
        )
        if self.is_2d:
            t, tp = plan.padding(self.output_lengths)
            out["token_padding_fraction"] = 1.0 - t / tp if tp else 0.0
        return cast(PlanStats, out)

    # ---- windowed plans (above EXACT_MAX_ROWS; the rest is in WindowedDurationPlan) ------------------------
    def buckets_of(self, rows: ArrayLike) -> NDArray[np.int64]:
        """The bucket of each of ``rows`` (the same for every cut of a batch)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.bucket_of is not None:
            return self.bucket_of[rows]
        if self.is_2d:
            return assign_buckets_2d(self.durations[rows], self.output_lengths[rows], self.bins, self.strict_2d)[0]
        return np.searchsorted(self.bins, np.asarray(self.durations[rows], dtype=np.float64), side="left")

    def global_plan(self) -> Plan:
        """The arranged global plan of the current epoch (materialised; windowed plans only when small)."""
        if not self.windowed:
            return super().global_plan()
        return self._materialise(self._part_plan(), MAX_PLAN_ROWS)

    def _on_demand(self):
        if not self.windowed:
            return None
        plan, epoch = self._part_plan(), self.epoch
        return plan.num_batches, lambda b: self._part_rows(epoch, *plan.part(b))
