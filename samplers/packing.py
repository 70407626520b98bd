"""Padding-free speech batches: cuts bin-packed into packs of at most ``max_duration`` seconds.

The packing alternative to bucketing in "Training and Inference Efficiency of Encoder-Decoder Speech Models"
(Żelasko et al., 2025): a varlen-attention encoder (FlashAttention's ``cu_seqlens``) takes the cuts of a pack
concatenated, so nothing is padded and the only waste is the room a pack leaves unused. Each epoch the cuts are
shuffled, cut into windows of ``window_packs`` packs' worth of audio, and each window is packed by best-fit
decreasing (``native.duration.pack_best_fit``); packs then come in random order. Windows keep pack-mates
changing between epochs; within a window best-fit decreasing leaves almost no room unused.

Above ``EXACT_MAX_ROWS`` cuts the plan is *windowed* (``samplers.packing_windowed``), so 1e9 memory-mapped
durations cost memory per pack, not per cut: windows of a block-level Feistel permutation of the cuts are each
shuffled and packed on their own (``native.pack_windows``), a counting pass gives every window's pack sizes, packs
are dealt in a seeded random order and a pack's cuts are computed when it is yielded.
"""

from __future__ import annotations

from typing import cast

import numpy as np
from numpy.typing import ArrayLike

from native.duration import pack_best_fit
from native.rng import permutation
from samplers.base import BatchSamplerBase, Plan, PlanStats, digest_array, take_batches
from samplers.bins import check_durations
from samplers.lazy_plan import SizePlan
from samplers.packing_windowed import PackWindows, scan_durations
from samplers.plan_cache import source_id
from samplers.windowed import WindowedPlan

__all__ = ["EXACT_MAX_ROWS", "PackedDurationSampler"]

#: Up to this many cuts the plan is exact (the whole epoch shuffled and packed: the plans of earlier versions,
#: ~70 B per cut); above, it is windowed (``samplers.packing_windowed``: memory per pack, not per cut).
EXACT_MAX_ROWS = 1 << 22


class PackedDurationSampler(WindowedPlan, BatchSamplerBase):
    """Packs of cuts whose total duration is at most ``max_duration`` (no cut is lost).

    Every usable cut is in exactly one pack per epoch. Cuts longer than ``max_duration`` cannot be packed:
    they are dropped and counted in ``stats()["dropped"]["longer_than_max_duration"]`` (``on_long="error"``
    raises instead). Durations must be finite and ``> 0``.

    Above :data:`EXACT_MAX_ROWS` cuts the plan is windowed (module docstring): ``durations`` may then be a
    memory-mapped float32 array of 1e9 cuts, validated in chunks and never copied; a rank holds ~36 B per pack.
    Windows of 65,536 cuts are packed on their own (sub-windows of ``window_packs`` packs' worth of audio, or the
    whole window with ``window_packs=None``). Both plans resume elastically.

    Args:
        durations: float ``[N]`` seconds per cut.
        max_duration: seconds per pack, ``> 0``.
        max_cuts: optional cap on cuts per pack.
        window_packs: packs' worth of shuffled cuts packed together (``None``: the whole epoch at once,
            tightest and least random).
        on_long: ``"drop"`` or ``"error"`` for cuts longer than ``max_duration``.
        shuffle: shuffle cuts and packs each epoch.
        seed, rank, world_size, drop_last: as in every sampler.

    Example:
        >>> sampler = PackedDurationSampler(ds.index["duration"], max_duration=600)     # doctest: +SKIP
        >>> loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_features)  # doctest: +SKIP
    """

    def __init__(self, durations: ArrayLike, max_duration: float, *, max_cuts: int | None = None,
                 window_packs: int | None = 64, on_long: str = "drop", shuffle: bool = True, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, drop_last: bool = False,
                 strict: bool = False) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size, drop_last=drop_last, strict=strict)
        self.windowed = np.ndim(durations) == 1 and len(durations) > EXACT_MAX_ROWS
        if self.windowed:
            arr = np.asarray(durations)
            self._digest = (len(arr), str(arr.dtype), digest_array(arr), source_id(durations))
            self.durations = arr
        else:
            self.durations = check_durations(durations)
        self.num_rows = len(self.durations)
        if not (isinstance(max_duration, (int, float, np.number)) and np.isfinite(max_duration)
                and max_duration > 0):
            raise ValueError(f"max_duration must be a finite number > 0 (got {max_duration=})")
        if max_cuts is not None and (not isinstance(max_cuts, (int, np.integer)) or max_cuts < 1):
            raise ValueError(f"max_cuts must be an integer >= 1 or None (got {max_cuts=})")
        if window_packs is not None and (not isinstance(window_packs, (int, np.integer)) or window_packs < 1):
            raise ValueError(f"window_packs must be an integer >= 1 or None (got {window_packs=})")
        if on_long not in ("drop", "error"):
            raise ValueError(f"on_long must be 'drop' or 'error' (got {on_long=})")
        self.max_duration = float(max_duration)
        self.max_cuts = None if max_cuts is None else int(max_cuts)
        self.window_packs = None if window_packs is None else int(window_packs)
        self.shuffle = bool(shuffle)
        self.options = f"max_duration={self.max_duration!r};max_cuts={max_cuts};window={window_packs};" \
                       f"shuffle={self.shuffle}"
        if self.windowed:
            self._init_windowed(on_long, strict)
            return
        too_long = self.durations > self.max_duration
        if too_long.any() and on_long == "error":
            i = int(np.flatnonzero(too_long)[0])
            raise ValueError(f"cut {i} lasts {self.durations[i]:.3f} s > max_duration={max_duration} "
                             f"({int(too_long.sum())} cuts in all); raise max_duration or use on_long='drop'")
        if too_long.any() and strict:
            raise ValueError(f"{int(too_long.sum())} cuts are longer than max_duration={max_duration} and would be "
                             f"dropped (first: cut {int(np.flatnonzero(too_long)[0])}; strict=True)")
        self._keep = np.flatnonzero(~too_long).astype(np.int64)
        self._dropped = {"longer_than_max_duration": int(too_long.sum())} if too_long.any() else {}
        if not drop_last and 0 < len(self._keep) < self.world_size:
            raise ValueError(f"world_size={self.world_size} is larger than the {len(self._keep)} usable cuts")

    def _init_windowed(self, on_long: str, strict: bool) -> None:
        count, first = scan_durations(self.durations, self.max_duration, self._digest)
        if count and on_long == "error":
            raise ValueError(f"cut {first} lasts {float(self.durations[first]):.3f} s > max_duration="
                             f"{self.max_duration} ({count} cuts in all); raise max_duration or use on_long='drop'")
        if count and strict:
            raise ValueError(f"{count} cuts are longer than max_duration={self.max_duration} and would be dropped "
                             f"(first: cut {first}; strict=True)")
        self._dropped = {"longer_than_max_duration": count} if count else {}
        usable = self.num_rows - count
        if not self.drop_last and 0 < usable < self.world_size:
            raise ValueError(f"world_size={self.world_size} is larger than the {usable} usable cuts")
        self._stream = PackWindows(self.durations, self._digest, self.seed, self.epoch_seed,
                                    max_duration=self.max_duration, max_cuts=self.max_cuts,
                                    window_packs=self.window_packs, shuffle=self.shuffle)
        self._lazy: tuple | None = None
        self._stream.tables(self.epoch)  # the counting pass of the first epoch, up front (or a cached one)

    def _options(self) -> dict:
        out = {"max_duration": self.max_duration, "max_cuts": self.max_cuts, "window_packs": self.window_packs,
               "shuffle": self.shuffle}
        if self.windowed:
            out.update(plan="windowed", window_rows=self._stream.window_rows, block_rows=self._stream.block)
        return out

    def _metadata(self) -> dict:
        digest = self._digest[2] if self.windowed else digest_array(self.durations)
        return {"rows": self.num_rows, "durations": digest}

    def _lost_share(self, plan: Plan) -> str:
        total = float(self.durations.sum())
        return f" ({1 - float(self.durations[plan.indices].sum()) / total:.1%} of seconds)" if total else ""

    def _build_plan(self, epoch: int) -> Plan:
        if self.windowed:
            t = self._stream.tables(epoch)
            return self._stream.materialise(epoch, SizePlan(0, t["sizes"], dict(t["dropped"])))
        rows = self._keep
        seed = self.epoch_seed(epoch)
        if self.shuffle:
            rows = rows[permutation(len(rows), seed)]
        if self.window_packs is None or len(rows) == 0:
            windows = np.array([0, len(rows)], dtype=np.int64)
        else:
            cs = np.cumsum(self.durations[rows])
            span = self.window_packs * self.max_duration
            marks = np.arange(span, cs[-1], span)
            windows = np.unique(np.concatenate([[0], np.searchsorted(cs, marks, side="right"), [len(rows)]]))
        idx, off = pack_best_fit(rows, self.durations, self.max_duration, window_offsets=windows,
                                 max_items=self.max_cuts, shuffle=False, seed=seed)
        plan = Plan(idx, off, dropped=dict(self._dropped))
        if self.shuffle:
            plan = take_batches(plan, permutation(plan.num_batches, self.epoch_seed(epoch, 1)))
        return plan

    def stats(self) -> PlanStats:
        """Plan statistics over all ranks: those of every sampler plus ``duration`` (s), ``fill_fraction``
        (audio over ``num_batches * max_duration``), ``unused_fraction`` (``1 - fill_fraction``: what a
        fixed-shape consumer would pad), ``padding_fraction`` (0: concatenated with ``cu_seqlens`` nothing is
        padded), ``mean_pack_duration`` and ``max_pack_duration``. A windowed plan (above ``EXACT_MAX_ROWS``)
        also gives ``plan`` and ``window_rows``; its seconds come from the counting pass (before evening out, so
        ``drop_last``'s uneven tail is not subtracted, and ``max_pack_duration`` is that of the packs before a
        split)."""
        if self.windowed:
            return self._windowed_stats()
        out: dict = dict(super().stats())  # the shared keys (PlanStats), then its own
        plan = self.global_plan()
        d = self.durations[plan.indices]
        real = float(d.sum())
        room = plan.num_batches * self.max_duration
        sums = np.add.reduceat(d, plan.offsets[:-1]) if plan.num_batches else np.zeros(0)
        out.update(
            duration=real,
            fill_fraction=real / room if room else 0.0,
            unused_fraction=1.0 - real / room if room else 0.0,
            padding_fraction=0.0,
            mean_pack_duration=float(sums.mean()) if len(sums) else 0.0,
            max_pack_duration=float(sums.max()) if len(sums) else 0.0,
        )
        return cast(PlanStats, out)

    # ---- windowed plans (above EXACT_MAX_ROWS) -------------------------------------------------------------
    def _windowed_stats(self) -> PlanStats:
        plan, t = self._size_plan(), self._stream.tables(self.epoch)
        nb, real = plan.num_batches, float(t["seconds"])
        room = nb * self.max_duration
        return cast(PlanStats, {
            **self._shared_stats(plan.sizes, plan.rows, plan.dropped, {}),
            "duration": real,
            "fill_fraction": real / room if room else 0.0,
            "unused_fraction": 1.0 - real / room if room else 0.0,
            "padding_fraction": 0.0,
            "mean_pack_duration": real / nb if nb else 0.0,
            "max_pack_duration": float(t["top"]),
            "plan": "windowed",
            "window_rows": self._stream.window_rows,
        })
