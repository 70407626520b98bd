"""Padding-free speech batches: cuts bin-packed into packs of at most ``max_duration`` seconds.

The packing alternative to bucketing in "Training and Inference Efficiency of Encoder-Decoder Speech Models"
(Żelasko et al., 2025): a varlen-attention encoder (FlashAttention's ``cu_seqlens``) takes the cuts of a pack
concatenated, so nothing is padded and the only waste is the room a pack leaves unused. Each epoch the cuts are
shuffled, cut into windows of ``window_packs`` packs' worth of audio, and each window is packed by best-fit
decreasing (``native.duration.pack_best_fit``); packs then come in random order. Windows keep pack-mates
changing between epochs; within a window best-fit decreasing leaves almost no room unused.
"""

from __future__ import annotations

from typing import cast

import numpy as np
from numpy.typing import ArrayLike

from native.duration import pack_best_fit
from native.rng import permutation
from samplers.base import BatchSamplerBase, Plan, PlanStats, digest_array, take_batches
from samplers.bins import check_durations

__all__ = ["PackedDurationSampler"]


class PackedDurationSampler(BatchSamplerBase):
    """Packs of cuts whose total duration is at most ``max_duration`` (no cut is lost).

    Every usable cut is in exactly one pack per epoch. Cuts longer than ``max_duration`` cannot be packed:
    they are dropped and counted in ``stats()["dropped"]["longer_than_max_duration"]`` (``on_long="error"``
    raises instead). Durations must be finite and ``> 0``.

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

    def __init__(self, durations: ArrayLike, *, max_duration: float, max_cuts: int | None = None,
                 window_packs: int | None = 64, on_long: str = "drop", shuffle: bool = True, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, drop_last: bool = False,
                 strict: bool = False) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size, drop_last=drop_last, strict=strict)
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
        self.max_cuts = max_cuts
        self.window_packs = window_packs
        self.shuffle = bool(shuffle)
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
        self.options = f"max_duration={self.max_duration!r};max_cuts={max_cuts};window={window_packs};" \
                       f"shuffle={self.shuffle}"

    def _options(self) -> dict:
        return {"max_duration": self.max_duration, "max_cuts": self.max_cuts, "window_packs": self.window_packs,
                "shuffle": self.shuffle}

    def _metadata(self) -> dict:
        return {"rows": self.num_rows, "durations": digest_array(self.durations)}

    def _lost_share(self, plan: Plan) -> str:
        total = float(self.durations.sum())
        return f" ({1 - float(self.durations[plan.indices].sum()) / total:.1%} of seconds)" if total else ""

    def _build_plan(self, epoch: int) -> Plan:
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
        padded), ``mean_pack_duration`` and ``max_pack_duration``."""
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
