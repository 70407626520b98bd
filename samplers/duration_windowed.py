"""The windowed plan of :class:`samplers.duration.DurationBucketSampler` (above ``EXACT_MAX_ROWS`` rows, 1D or 2D
buckets).

The batching of "Training and Inference Efficiency of Encoder-Decoder Speech Models" (Żelasko et al., 2025) at a
scale where the epoch's plan cannot be materialised: rows are grouped in blocks of contiguous rows, the blocks
permuted by a stateless Feistel permutation, and each window (a contiguous range of that block permutation) is
shuffled, split by bucket, sorted in chunks and cut under the budget on its own
(:mod:`native.duration_windows`). 1D and 2D buckets (duration x output tokens: NeMo's rule with ``strict_2d``,
promotion and ``outside_2d_bins`` drops, as the exact plan applies them) share this path; only the kernel's
bucket-assignment step differs, and 2D bins come from the same evenly strided sample of both arrays. A counting
pass gives every window's batch sizes and buckets once per epoch
(kept on disk for memory-mapped durations, :mod:`samplers.plan_cache`); steps of ``world_size`` batches of one
bucket are laid out in a seeded random order (:mod:`samplers.grouped_lazy_plan`), and a batch's rows are computed
from its window when it is yielded. The tunables (``WINDOW_ROWS``, ``BLOCK_ROWS``, ``SAMPLE_ROWS``,
``MAX_PLAN_ROWS``) live in :mod:`samplers.duration`, which reads them when a sampler is built and passes them here.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import cast

import numpy as np
from numpy.typing import ArrayLike, NDArray

from native.duration import assign_buckets_2d, duration_window_batches, duration_window_sizes
from native.duration_windows import WINDOW_STATS
from native.feistel import mix_prefix
from samplers.base import Plan, PlanStats, digest_array
from samplers.grouped_lazy_plan import PartPlan, arrange_parts, window_major_steps
from samplers.lazy_plan import check_durations_part, check_lengths_chunked
from samplers.plan_cache import PlanCache, check_window, source_id

__all__ = ["MIN_CHUNKS", "WindowedDurationPlan", "cut_cost"]

#: Every bucket is sorted in at least this many chunks, so a cut's batch-mates change between epochs (both plans).
MIN_CHUNKS = 4
#: Windows per call of the counting kernel (bounds its outputs to ~``6 * WINDOW_ROWS`` bytes each).
_COUNT_WINDOWS = 16
#: Rows validated per step of the windowed path's scan (float64 temporaries of 128 MiB at most).
_SCAN_CHUNK = 1 << 24
#: Counting passes shared by the samplers of one process and, for memory-mapped durations, kept on disk (a resume
#: builds a second sampler over the same durations, often in a fresh process): key -> read-only tables.
_PASSES = PlanCache("duration")
#: The first arrangement of a counted epoch (the last one), shared by the samplers of one process.
_SHARED_ARRANGED: OrderedDict = OrderedDict()
#: Whole-file scans of the durations (validation, cuts over the budget, the bin sample), kept the same way.
_SCANS = PlanCache("duration_scan", keep=16)


def cut_cost(d: NDArray[np.float64], quadratic_duration: float | None) -> NDArray[np.float64]:
    """Budget cost of cuts of duration ``d``: ``d + d**2 / q`` with a quadratic term, else ``d``."""
    return d if quadratic_duration is None else d + d * d / quadratic_duration


def _check_durations_chunked(durations: ArrayLike, name: str = "durations") -> NDArray:
    """:func:`samplers.bins.check_durations` for arrays too large to copy: 1-D, numbers, finite, ``> 0``, checked
    ``_SCAN_CHUNK`` rows at a time. Returns the array as given (a float32 memory map stays one)."""
    arr = np.asarray(durations)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (got shape {arr.shape})")
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be numbers (got dtype {arr.dtype})")
    for a in range(0, len(arr), _SCAN_CHUNK):
        check_durations_part(arr[a : a + _SCAN_CHUNK], a, name)
    return arr


class WindowedDurationPlan:
    """The windowed path of :class:`samplers.duration.DurationBucketSampler`, as a mixin of its host class.

    The host is a :class:`samplers.base.BatchSamplerBase` (``seed``, ``epoch``, ``world_size``, ``drop_last``,
    ``strict``, ``epoch_seed``, ``_segments``, ``_announce``, ``_shared_stats``) that calls
    :meth:`_init_windowed_durations` first, then sets ``num_rows``, ``max_duration``, ``quadratic_duration``,
    ``max_cuts``, ``chunk_batches``, ``shuffle``, ``strict_2d``, ``output_lengths`` (``None``, or from
    :meth:`_init_windowed_lengths`), ``bins`` (1D ``[K-1]`` or 2D ``[K, 2]``), ``is_2d``, ``num_buckets`` and provides
    ``_resolve_caps`` and ``_options``, then calls :meth:`_init_windowed`. The module's caches (counting passes,
    scans, the shared arrangement) are kept here, one set for every host.
    """

    def _init_windowed_durations(self, durations: ArrayLike, *, sample_rows: int) -> None:
        """Take ``durations`` as given (a float32 memory map stays one): validated in chunks, once per file (a
        second sampler over the same durations skips the scan); the bins come from every
        ``ceil(N / sample_rows)``-th duration."""
        arr = np.asarray(durations)
        self._sample_rows = sample_rows
        self._digest = (len(arr), str(arr.dtype), digest_array(arr) if arr.ndim == 1 else "", source_id(durations))
        # a second sampler over the same durations (a resume, also in a fresh process for a memory map) skips
        # the scans
        self._memo(("valid",), lambda: len(_check_durations_chunked(arr)), source=durations)
        self.durations = arr

    def _init_windowed_lengths(self, output_lengths: ArrayLike) -> NDArray:
        """Take ``output_lengths`` (2D buckets) as given, like the durations: one row per duration, whole numbers
        ``>= 0``, validated in chunks once per file (a memory map stays one). Returns the array."""
        arr = np.asarray(output_lengths)
        if arr.ndim != 1 or len(arr) != self._digest[0]:
            raise ValueError(f"output_lengths must have shape ({self._digest[0]},), one per duration (got shape "
                             f"{arr.shape})")
        self._tok_digest = (str(arr.dtype), digest_array(arr), source_id(output_lengths))
        _SCANS.memo((("valid_tokens",), self._tok_digest), output_lengths,
                    lambda: {"value": len(check_lengths_chunked(arr, "output_lengths"))})
        return arr

    def _init_windowed(self, on_long: str, bucket_batch_sizes, *, window_rows: int, block_rows: int) -> None:
        """The windowed plan's set-up, once the host has set its options, bins and buckets: cuts over the budget
        counted (or refused with ``on_long="error"``), per-bucket caps, the window geometry (``window_rows`` rows in
        windows of permuted blocks of ``block_rows`` rows; with 2D bins, times the mean number of sub-buckets of a
        duration bound), and the counting pass of the first epoch."""
        def over_budget() -> list[int]:
            count, first = 0, -1
            for a in range(0, self.num_rows, _SCAN_CHUNK):
                d = np.asarray(self.durations[a : a + _SCAN_CHUNK], dtype=np.float64)
                hit = np.flatnonzero(cut_cost(d, self.quadratic_duration) > self.max_duration)
                if len(hit) and first < 0:
                    first = a + int(hit[0])
                count += len(hit)
            return [count, first]

        count, first = (int(x) for x in self._memo(("over", self.max_duration, self.quadratic_duration), over_budget))
        if count and on_long == "error":
            raise ValueError(f"cut {first} lasts {float(self.durations[first]):.3f} s, over max_duration="
                             f"{self.max_duration} ({count} cuts in all); raise max_duration or use on_long='drop'")
        self.dropped_static = {"longer_than_max_duration": count} if count else {}
        if self.strict and count:
            raise ValueError(f"the plan would drop {count} cuts ({self.dropped_static}; strict=True): raise "
                             "max_duration or widen the bins")
        usable = self.num_rows - count
        if not self.drop_last and 0 < usable < self.world_size:
            raise ValueError(f"world_size={self.world_size} is larger than the {usable} usable cuts")
        self.promoted = {"to_fit_2d_bins": 0, "from_small_bucket": 0}  # 2D: counted by the pass, below
        self.bucket_of = None  # not kept per row at this size: see buckets_of()
        self._caps = self._resolve_caps(bucket_batch_sizes)
        if self.is_2d:  # a duration bucket's rows are shared by its sub-buckets: windows as many times larger, so a
            # bucket gets as many cuts per window as a 1D bucket (padding as the exact plan's; bench_duration2d_scale)
            window_rows *= -(-self.num_buckets // max(1, len(np.unique(self.bins[:, 0]))))
        self._block = block_rows
        self._per_window = max(1, window_rows // block_rows)
        self._window_rows = self._per_window * self._block
        self._num_windows = -(-self.num_rows // self._window_rows)
        self._chunk_rows = self._windowed_chunk_rows()
        self.options = (f"max_duration={self.max_duration!r};q={self.quadratic_duration!r};max_cuts={self.max_cuts};"
                        f"buckets={self.num_buckets};2d={self.is_2d};chunk={self.chunk_batches};shuffle={self.shuffle};"
                        f"plan=windowed")
        self._epoch_tables: OrderedDict = OrderedDict()
        self._windows: OrderedDict = OrderedDict()
        self._lazy: tuple | None = None
        t = self._tables(self.epoch)  # the counting pass of the first epoch, up front (or another sampler's)
        if self.is_2d:  # a cut's 2D bucket does not depend on the epoch: any pass counts the same
            self.promoted["to_fit_2d_bins"] = int(t.get("promoted", 0))
            outside = int(t["dropped"].get("outside_2d_bins", 0))
            if self.strict and outside:
                raise ValueError(f"the plan would drop {count + outside} cuts ({dict(t['dropped'])}; strict=True): "
                                 "raise max_duration or widen the bins")

    def _memo(self, key, compute, source=None):
        """A result over these durations computed once (a resume's second sampler skips the pass; for a memory map
        also in a fresh process, see :mod:`samplers.plan_cache`)."""
        source = self.durations if source is None else source
        return _SCANS.memo((key, self._digest), source, lambda: {"value": compute()})["value"]

    def _sample(self) -> NDArray[np.float64]:
        """Every ``ceil(N / sample_rows)``-th duration (float64; ``sample_rows`` as given to
        :meth:`_init_windowed_durations`)."""
        step = -(-self.num_rows // self._sample_rows)
        return self._memo(("sample", self._sample_rows),
                          lambda: np.asarray(self.durations[::step], dtype=np.float64))

    def _sample_tokens(self) -> NDArray[np.float64]:
        """The output lengths of the rows :meth:`_sample` reads (2D buckets), float64."""
        step = -(-self.num_rows // self._sample_rows)
        return _SCANS.memo((("sample_tokens", self._sample_rows), self._tok_digest), self.output_lengths,
                           lambda: {"value": np.asarray(self.output_lengths[::step], dtype=np.float64)})["value"]

    def _windowed_chunk_rows(self) -> NDArray[np.int64]:
        """Rows per sorted chunk of each bucket, from the bin sample's mean cost per bucket (at most a quarter of a
        bucket's expected rows in one window, so each is sorted in several chunks)."""
        if self.chunk_batches == 0:
            return np.zeros(self.num_buckets, dtype=np.int64)
        d = self._sample()
        cost = cut_cost(d, self.quadratic_duration)
        fits = cost <= self.max_duration
        if self.is_2d:  # the sample's 2D buckets, as the kernel assigns them
            b = assign_buckets_2d(d, self._sample_tokens(), self.bins, self.strict_2d)[0]
            fits &= b >= 0
            b = b[fits]
        d, cost = d[fits], cost[fits]
        if not self.is_2d:
            b = np.searchsorted(self.bins, d, side="left")
        counts = np.bincount(b, minlength=self.num_buckets).astype(np.float64)
        sums = np.bincount(b, weights=cost, minlength=self.num_buckets)
        mean = np.where(counts > 0, sums / np.maximum(counts, 1), 1.0)
        per_batch = np.minimum(np.floor(self.max_duration / mean), self._caps.astype(np.float64))
        rows = self.chunk_batches * np.maximum(per_batch, 1)
        per_window = counts / max(1.0, counts.sum()) * self._window_rows
        rows = np.minimum(rows, np.ceil(per_window / MIN_CHUNKS))
        return np.maximum(1, rows).astype(np.int64)

    def _window_kw(self, epoch: int) -> dict:
        kw = dict(block=self._block, per_window=self._per_window, permute=self.shuffle,
                  block_seed=self.epoch_seed(epoch, 0xB10C), prefix=mix_prefix(self.epoch_seed(epoch, 0x5107)),
                  bins=self.bins, max_duration=self.max_duration, quadratic_duration=self.quadratic_duration,
                  chunk_rows=self._chunk_rows, caps=self._caps)
        if self.is_2d:  # the one difference of 2D buckets: the kernel assigns each cut from both arrays
            kw.update(output_lengths=self.output_lengths, strict_2d=self.strict_2d)
        return kw

    def _pass_key(self, epoch: int) -> tuple:
        """What a counting pass is computed from (1D keys are those of earlier versions: their disk entries stay
        valid); 2D adds the output lengths' digest and identity."""
        key = (self._digest, repr(self._options()), self.seed, epoch)
        return key + (self._tok_digest,) if self.is_2d else key

    def _tables(self, epoch: int) -> dict:
        """The counting pass of an epoch: size and bucket of every window's batches (window after window)."""
        if epoch in self._epoch_tables:
            self._epoch_tables.move_to_end(epoch)
            return self._epoch_tables[epoch]
        key = self._pass_key(epoch)
        tables = _PASSES.memo(key, self.durations, lambda: self._count(epoch, key))
        self._epoch_tables[epoch] = tables
        while len(self._epoch_tables) > 2:
            self._epoch_tables.popitem(last=False)
        return tables

    def _count(self, epoch: int, key) -> dict:
        kw = self._window_kw(epoch)
        sizes, buckets, totals, top = [], [], np.zeros(len(WINDOW_STATS)), 0.0
        for w0 in range(0, self._num_windows, _COUNT_WINDOWS):
            sz, gr, st = duration_window_sizes(self.durations, w0, min(self._num_windows, w0 + _COUNT_WINDOWS), **kw)
            sizes.extend(sz)
            buckets.extend(gr)
            for row in st:  # in window order: the same sums on every rank
                totals += row
                top = max(top, float(row[4]))
        wcum = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in sizes], out=wcum[1:])
        size = np.concatenate(sizes) if sizes else np.zeros(0, np.int32)
        del sizes
        bucket = np.concatenate(buckets) if buckets else np.zeros(0, np.int16)
        del buckets
        dropped = {"longer_than_max_duration": int(totals[0])} if totals[0] else {}
        if totals[5]:
            dropped["outside_2d_bins"] = int(totals[5])
        return {"wcum": wcum, "size": size, "bucket": bucket, "dropped": dropped, "key": repr(key),
                "seconds": float(totals[1]), "padded": float(totals[2]), "dropped_seconds": float(totals[3]),
                "top": top, "promoted": int(totals[6]), "tokens": float(totals[7]), "padded_tokens": float(totals[8])}

    def _first_parts(self, epoch: int, world_size: int) -> PartPlan:
        """The epoch's plan arranged for ``world_size`` ranks (``group_steps`` on the counted batches)."""
        t = self._tables(epoch)
        key = (t["key"], world_size, self.drop_last)
        if key in _SHARED_ARRANGED:
            return _SHARED_ARRANGED[key]
        plan = arrange_parts(None, None, t["size"], t["bucket"], world_size, self.drop_last, t["dropped"],
                             order_steps=self._order_steps(epoch))
        _SHARED_ARRANGED.clear()
        _SHARED_ARRANGED[key] = plan
        return plan

    def _order_steps(self, epoch: int):
        """The step-order hook of an epoch (``group_steps``' ``order_steps``), the one order of the lazy plan
        (:func:`arrange_parts`) and the materialised one (the base class's ``group_steps``): windows in a seeded
        order, each window's steps together, so a rank plans a window once per run of steps, not once per batch.
        ``None`` without ``shuffle`` (steps group by group)."""
        if not self.shuffle:
            return None
        wcum, seed = self._tables(epoch)["wcum"], self.epoch_seed(epoch, 0x5EED)
        return lambda first_src: window_major_steps(first_src, wcum, seed)

    def _part_plan(self) -> PartPlan:
        """The arranged plan of the current epoch and world size, after any elastic segments."""
        key = (self.epoch, self._segments, self.world_size)
        if self._lazy is None or self._lazy[0] != key:
            self._lazy = None
            epoch, bucket = self.epoch, self._tables(self.epoch)["bucket"]
            if not self._segments:
                plan = self._first_parts(epoch, self.world_size)
            else:
                w0, k0 = self._segments[0]
                plan = self._first_parts(epoch, w0).skip(k0 * w0)
                for w, k in self._segments[1:]:
                    plan = arrange_parts(plan.src, plan.a, plan.size, bucket[plan.src], w, self.drop_last,
                                         plan.dropped, in_time=True).skip(k * w)  # skip: in arranged order
                plan = arrange_parts(plan.src, plan.a, plan.size, bucket[plan.src], self.world_size, self.drop_last,
                                     plan.dropped, in_time=True)
            self._lazy = (key, plan)
            self._announce(self.epoch, plan.dropped, {})
        return self._lazy[1]

    def _window(self, epoch: int, w: int) -> tuple:
        key = (epoch, w)
        if key not in self._windows:
            self._windows[key] = got = duration_window_batches(self.durations, w, **self._window_kw(epoch))
            t = self._tables(epoch)
            check_window(t, w, np.diff(got[1]), t["size"], t["wcum"], lambda: self._forget(epoch))
            while len(self._windows) > 4:
                self._windows.popitem(last=False)
        return self._windows[key]

    def _forget(self, epoch: int) -> None:
        _PASSES.forget(self._pass_key(epoch), self.durations)
        self._epoch_tables.pop(epoch, None)

    def _part_rows(self, epoch: int, src: int, a: int, size: int) -> NDArray[np.int64]:
        wcum = self._tables(epoch)["wcum"]
        w = int(np.searchsorted(wcum, src, side="right")) - 1
        rows, off, _ = self._window(epoch, w)
        start = int(off[src - int(wcum[w])]) + a
        return rows[start : start + size].copy()

    def _materialise(self, plan: PartPlan, max_rows: int) -> Plan:
        """The rows of ``plan`` (each window planned once), refused above ``max_rows`` rows."""
        if plan.rows > max_rows:
            raise ValueError(f"global_plan() would materialise {plan.rows} rows (> {max_rows}); iterate the "
                             "sampler instead, it computes batches on demand")
        g = plan.grouped_index(np.arange(plan.num_batches, dtype=np.int64))
        src, a, size = plan.src[g], plan.a[g].astype(np.int64), plan.size[g].astype(np.int64)
        t = self._tables(self.epoch)
        win = np.searchsorted(t["wcum"], src, side="right") - 1
        offsets = np.zeros(len(size) + 1, dtype=np.int64)
        np.cumsum(size, out=offsets[1:])
        rows = np.empty(int(offsets[-1]), dtype=np.int64)
        for w in np.unique(win).tolist():  # each window planned once, its batches put in place
            wrows, woff, _ = duration_window_batches(self.durations, w, **self._window_kw(self.epoch))
            check_window(t, w, np.diff(woff), t["size"], t["wcum"], lambda: self._forget(self.epoch))
            for b in np.flatnonzero(win == w).tolist():
                start = int(woff[src[b] - t["wcum"][w]]) + int(a[b])
                rows[offsets[b] : offsets[b + 1]] = wrows[start : start + size[b]]
        return Plan(rows, offsets, t["bucket"][src].astype(np.int64), dict(plan.dropped))

    def _windowed_stats(self) -> PlanStats:
        """Statistics of a windowed plan from the counting pass (seconds and padding before an elastic split)."""
        plan, t = self._part_plan(), self._tables(self.epoch)
        size, nb = plan.size, plan.num_batches
        real, padded = t["seconds"], t["padded"]
        extra = {}
        if self.is_2d:
            tok, ptok = t.get("tokens", 0.0), t.get("padded_tokens", 0.0)
            extra["token_padding_fraction"] = 1.0 - tok / ptok if ptok else 0.0
        return cast(PlanStats, {
            **self._shared_stats(size, plan.rows, plan.dropped, {}),
            "duration": real,
            "padded_duration": padded,
            "padding_fraction": 1.0 - real / padded if padded else 0.0,
            "mean_batch_duration": real / nb if nb else 0.0,
            "num_buckets": self.num_buckets,
            "batches_per_bucket": np.bincount(t["bucket"][plan.src], minlength=self.num_buckets).tolist(),
            "cuts_per_bucket": np.bincount(t["bucket"], weights=t["size"], minlength=self.num_buckets)
            .astype(np.int64).tolist(),
            "promoted": int(sum(self.promoted.values())),
            "promoted_by_reason": dict(self.promoted),
            "discarded": int(sum(plan.dropped.values())),
            "bins": self.bins.tolist(),
            "plan": "windowed",
            "window_rows": self._window_rows,
            **extra,
        })

