"""The windowed plan of :class:`samplers.PackedDurationSampler`: packs of 1e9 memory-mapped cuts in bounded memory.

Above ``samplers.packing.EXACT_MAX_ROWS`` cuts the epoch is not shuffled and packed whole (~70 B per cut). Cuts
are grouped in blocks of :data:`BLOCK_ROWS` contiguous rows, the blocks permuted by a stateless Feistel
permutation, and each window of :data:`WINDOW_ROWS` cuts (a contiguous range of that block permutation) is
shuffled, split into sub-windows of ``window_packs`` packs' worth of audio and packed by best-fit decreasing on
its own (``native.pack_windows``). A counting pass over the durations (parallel over windows, reading the memory
map almost sequentially) gives every window's pack sizes once per epoch; the packs of all windows are dealt in a
seeded random order (a Feistel permutation of the packs), and a pack's cuts are computed from its window alone
when it is yielded. A rank keeps ~36 B per pack (1e9 cuts of ~7 s in 600 s packs: ~1.2e7 packs, ~450 MB), no
memory per cut. The pass is kept by :class:`samplers.plan_cache.PlanCache` (on disk for a memory map), so a
restarted job resumes without counting again.

The plan differs from the exact one in that sub-windows restart at window boundaries (each window's audio is
split into ``round(seconds / (window_packs * max_duration))`` sub-windows of equal seconds rather than cut every
``window_packs * max_duration`` seconds of the epoch; ``window_packs=None`` packs each window whole) and that
pack-mates come from one window; ``benchmarks/bench_packing_scale.py`` shows pack fill and pack-mate overlap
across epochs of both plans.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from native.feistel import mix_prefix
from native.pack_windows import pack_window_batches, pack_window_sizes
from samplers.lazy_plan import check_durations_part
from samplers.plan_cache import PlanCache
from samplers.windowed import DEAL_SALT, MAX_PLAN_ROWS, WindowedStream

__all__ = ["BLOCK_ROWS", "MAX_PLAN_ROWS", "WINDOW_ROWS", "PackWindows", "scan_durations"]

#: Cuts planned together in the windowed plan (~11 sub-windows of 64 packs of 600 s at ~7 s per cut).
WINDOW_ROWS = 1 << 16
#: Contiguous rows moved together by the block permutation (one 64-byte line of float32 durations).
BLOCK_ROWS = 16
#: Rows validated per step of the whole-file scan (float64 temporaries of 128 MiB at most).
_SCAN_CHUNK = 1 << 24
#: Counting passes shared by the samplers of one process and, for memory-mapped durations, kept on disk:
#: (durations digest, options, seed, epoch) -> tables (read-only).
_PASSES = PlanCache("packed_duration")
#: Whole-file scans of the durations (validation and cuts over ``max_duration``), kept the same way.
_SCANS = PlanCache("packed_duration_scan", keep=8)


def scan_durations(durations: NDArray, max_duration: float, key, name: str = "durations") -> tuple[int, int]:
    """Check ``durations`` (1-D numbers, finite, ``> 0``) ``_SCAN_CHUNK`` rows at a time, never copying it whole,
    and count the cuts longer than ``max_duration``: ``(count, first such row or -1)``. The result is kept under
    ``key`` (a resume's second sampler, also in a fresh process for a memory map, skips the scan).

    Raises:
        ValueError: naming the first row that is NaN/inf or ``<= 0``.
    """
    arr = np.asarray(durations)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (got shape {arr.shape})")
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be numbers (got dtype {arr.dtype})")

    def scan() -> dict:
        count, first = 0, -1
        for a in range(0, len(arr), _SCAN_CHUNK):
            part = np.asarray(arr[a : a + _SCAN_CHUNK], dtype=np.float64)
            check_durations_part(part, a, name)
            hit = np.flatnonzero(part > max_duration)
            if len(hit) and first < 0:
                first = a + int(hit[0])
            count += len(hit)
        return {"count": count, "first": first}

    got = _SCANS.memo(("scan", key, float(max_duration)), durations, scan)
    return int(got["count"]), int(got["first"])


class PackWindows(WindowedStream):
    """The windowed packs of one sampler's durations and options, epoch by epoch (:class:`WindowedStream` with
    best-fit-decreasing windows). ``tables(epoch)`` also gives ``seconds`` (packed audio) and ``top`` (the longest
    pack) from the counting pass.

    Args:
        durations: float ``[N]`` seconds (a memory map stays one).
        digest: what identifies the durations (length, dtype, digest, source) for the caches.
        seed: the sampler's seed; ``epoch_seed(epoch, salt)`` its seed of an epoch.
        max_duration, max_cuts, window_packs, shuffle: the sampler's.
    """

    def __init__(self, durations: NDArray, digest: tuple, seed: int, epoch_seed: Callable[..., int], *,
                 max_duration: float, max_cuts: int | None, window_packs: int | None, shuffle: bool) -> None:
        self.durations, self.digest, self.seed = durations, digest, seed
        self.epoch_seed = epoch_seed
        self.max_duration, self.max_cuts, self.window_packs, self.shuffle = (max_duration, max_cuts, window_packs,
                                                                              shuffle)
        self.block = BLOCK_ROWS
        self.per_window = max(1, WINDOW_ROWS // BLOCK_ROWS)
        self.window_rows = self.per_window * self.block
        super().__init__(durations, _PASSES, self._key, -(-len(durations) // self.window_rows), self._count_packs,
                         lambda w, epoch: pack_window_batches(self.durations, w, **self._kw(epoch)),
                         lambda epoch: self.epoch_seed(epoch, DEAL_SALT) if self.shuffle else None,
                         _dropped, what="packs")

    def _kw(self, epoch: int) -> dict:
        return dict(block=self.block, per_window=self.per_window, permute=self.shuffle,
                    block_seed=self.epoch_seed(epoch, 0xB10C), prefix=mix_prefix(self.epoch_seed(epoch, 0x5107)),
                    max_duration=self.max_duration, max_cuts=self.max_cuts,
                    window_seconds=None if self.window_packs is None else self.window_packs * self.max_duration)

    def _key(self, epoch: int) -> tuple:
        options = (self.max_duration, self.max_cuts, self.window_packs, self.shuffle, self.window_rows, self.block)
        return (self.digest, repr(options), self.seed, epoch)

    def _count_packs(self, w0: int, w1: int, epoch: int):
        return pack_window_sizes(self.durations, w0, w1, **self._kw(epoch))

    def tables(self, epoch: int) -> dict:
        t = super().tables(epoch)
        if "seconds" not in t:
            st = t["window_stats"]
            seconds, top = 0.0, 0.0
            for row in st.tolist():  # in window order: the same sums on every rank
                seconds += row[1]
                top = max(top, row[2])
            t["seconds"], t["top"] = seconds, top
        return t


def _dropped(window_stats: NDArray) -> dict:
    n = int(sum(int(r[0]) for r in window_stats.tolist())) if len(window_stats) else 0
    return {"longer_than_max_duration": n} if n else {}
