"""Windowed best-fit-decreasing packing: the packs of one window of cuts depend on nothing else.

The windowed plan of ``samplers.PackedDurationSampler`` (above its exact threshold). A window is a contiguous
range of a block-level Feistel permutation of the cuts (``native.windows.window_blocks``: blocks of ``block``
contiguous rows, so a pass reads a memory-mapped float32 column almost sequentially); its cuts longer than
``max_duration`` are left out, the rest shuffled (Fisher-Yates, seed ``mix_step(prefix, w)``), split into
sub-windows of about ``window_seconds`` of audio (``round(total / window_seconds)`` parts of equal seconds, at
least one; ``window_seconds <= 0``: the whole window), and each sub-window packed by best-fit decreasing: cuts
longest first (a stable sort, so ties keep the shuffled order), each into the open pack with the least room that
still holds it, else a new pack. Room is quantised exactly as ``native.duration.pack_best_fit`` quantises it
(keys of ``1 / scale`` seconds, rounded so a fit is never overstated; a 64-ary bitmap finds the best key), and
:func:`bfd` gives the packs ``pack_best_fit`` gives for the same order (the tests check it): best-fit decreasing
as in Johnson, "Near-optimal bin packing algorithms" (1973).

:func:`pack_window_sizes` is the counting pass (pack sizes of many windows, parallel over windows: each window's
packs are computed on their own, so the result is bitwise the same for any thread count);
:func:`pack_window_batches` gives one window's rows, pack after pack, when its packs are yielded.
"""

from __future__ import annotations

import numba
import numpy as np
from numpy.typing import NDArray

from native._config import njit
from native.rng import MASK63, mix_step, shuffle_from
from native.sorted_cuts import sort_chunk
from native.windows import take_window

__all__ = ["MAX_KEYS", "bfd", "bfd_kernel", "index_new", "pack_scale", "pack_segments", "pack_window_batches",
           "pack_window_sizes", "tree_size"]

#: the room index has at most this many keys (as ``native.duration.pack_best_fit``'s)
MAX_KEYS = 2**17
_DEBRUIJN_TABLE = np.zeros(64, dtype=np.int64)
for _i in range(64):
    _DEBRUIJN_TABLE[((1 << _i) * 0x03F79D71B4CB0A89 & 0xFFFFFFFFFFFFFFFF) >> 58] = _i
#: windows handled by one lane of the parallel counting kernel share one room index (cleared after each
#: sub-window, so a window's packs do not depend on the lane)
_LANES = 16


def pack_scale(capacity: float, resolution: float = 1e-3) -> float:
    """Keys per second of the remaining-room index: ``1 / resolution``, coarser when ``capacity / resolution``
    would exceed 131,072 keys (``native.duration.pack_best_fit``'s rule)."""
    return min(1.0 / resolution, float(MAX_KEYS) / capacity)


@njit
def tree_size(capacity: np.float64, scale: np.float64) -> np.int64:
    """Keys of the remaining-room index: the power of two ``>= floor(capacity * scale) + 1`` (at most 2**18)."""
    nleaves = np.int64(np.floor(capacity * scale)) + 1
    size = np.int64(64)
    while size < nleaves:
        size *= 2
    return size


@njit
def index_new(size: np.int64) -> np.ndarray:
    """An empty index over ``size`` keys: a three-level 64-ary bitmap (bit ``k`` of level 0 set iff key ``k`` holds
    an open pack; a level-1 bit per non-zero level-0 word, a level-2 bit per non-zero level-1 word), laid out as
    ``[level 0 (size / 64 words) | level 1 (64 words) | level 2 (1 word)]``. Finding the smallest key ``>= q`` is
    a few word operations, where a segment tree walks 18 levels."""
    return np.zeros(size // 64 + 65, dtype=np.uint64)


@njit(inline="always")
def _ctz(x: np.uint64) -> np.int64:
    """Index of the lowest set bit of ``x != 0`` (de Bruijn multiplication)."""
    low = x & (~x + np.uint64(1))
    return _DEBRUIJN_TABLE[np.int64((low * np.uint64(0x03F79D71B4CB0A89)) >> np.uint64(58))]


@njit(inline="always")
def _index_set(bits: np.ndarray, size: np.int64, key: np.int64) -> None:
    l1 = size // 64
    w = key >> 6
    was = bits[w]
    bits[w] = was | (np.uint64(1) << np.uint64(key & 63))
    if was == 0:
        was1 = bits[l1 + (w >> 6)]
        bits[l1 + (w >> 6)] = was1 | (np.uint64(1) << np.uint64(w & 63))
        if was1 == 0:
            bits[l1 + 64] |= np.uint64(1) << np.uint64(w >> 6)


@njit(inline="always")
def _index_clear(bits: np.ndarray, size: np.int64, key: np.int64) -> None:
    l1 = size // 64
    w = key >> 6
    now = bits[w] & ~(np.uint64(1) << np.uint64(key & 63))
    bits[w] = now
    if now == 0:
        now1 = bits[l1 + (w >> 6)] & ~(np.uint64(1) << np.uint64(w & 63))
        bits[l1 + (w >> 6)] = now1
        if now1 == 0:
            bits[l1 + 64] &= ~(np.uint64(1) << np.uint64(w >> 6))


@njit(inline="always")
def _index_first_at_or_after(bits: np.ndarray, size: np.int64, q: np.int64) -> np.int64:
    """Smallest key ``>= q`` that holds an open pack, or -1."""
    if q >= size:
        return -1
    full = ~np.uint64(0)
    l1 = size // 64
    w = q >> 6
    x = bits[w] & (full << np.uint64(q & 63))
    if x != 0:
        return (w << 6) + _ctz(x)
    w += 1  # the next non-empty level-0 word
    if w >= l1:
        return -1
    v = w >> 6
    x = bits[l1 + v] & (full << np.uint64(w & 63))
    if x == 0:
        v += 1
        if v >= 64:
            return -1
        y = bits[l1 + 64] & (full << np.uint64(v))
        if y == 0:
            return -1
        v = _ctz(y)
        x = bits[l1 + v]
    w = (v << 6) + _ctz(x)
    return (w << 6) + _ctz(bits[w])


@njit
def bfd_kernel(d: np.ndarray, capacity: np.float64, max_items: np.int64, scale: np.float64, bits: np.ndarray,
         size: np.int64, head: np.ndarray, pack_of: np.ndarray, cnt: np.ndarray, sec: np.ndarray) -> np.int64:
    """Best-fit decreasing of durations ``d`` (already longest first): ``pack_of[t]`` the pack of item ``t``,
    ``cnt[p]`` / ``sec[p]`` items and seconds of pack ``p`` (packs numbered as opened); returns the pack count.
    Open packs sit in a list per room key (``head``, last in first out, as ``pack_best_fit``'s) indexed by
    ``bits`` (:func:`index_new`); both come in empty and are left empty."""
    n = d.shape[0]
    rem = np.empty(n, dtype=np.float64)
    nxt = np.full(n, -1, dtype=np.int64)
    key_of = np.full(n, -1, dtype=np.int64)
    npacks = 0
    for t in range(n):
        x = d[t]
        need = np.int64(np.ceil(x * scale))
        leaf = _index_first_at_or_after(bits, size, need)
        if leaf >= 0:
            p = head[leaf]
            head[leaf] = nxt[p]
            key_of[p] = -1
            if head[leaf] < 0:
                _index_clear(bits, size, leaf)
        else:
            p = npacks
            npacks += 1
            rem[p] = capacity
            cnt[p] = 0
            sec[p] = 0.0
        rem[p] -= x
        cnt[p] += 1
        sec[p] += x
        pack_of[t] = p
        if cnt[p] < max_items:
            key = np.int64(np.floor(rem[p] * scale))
            if key >= 0:
                key_of[p] = key
                nxt[p] = head[key]
                if head[key] < 0:
                    _index_set(bits, size, key)
                head[key] = p
    for p in range(npacks):  # leave the index and the list heads empty for the next sub-window
        if key_of[p] >= 0 and head[key_of[p]] >= 0:
            head[key_of[p]] = -1
            _index_clear(bits, size, key_of[p])
    return npacks


@njit
def _window_cuts(durations: np.ndarray, w: np.int64, n: np.int64, block: np.int64, per_window: np.int64,
                 permute: bool, block_seed: np.uint64, prefix: np.uint64,
                 max_duration: np.float64) -> tuple[np.ndarray, np.ndarray, np.int64]:
    """Window ``w``'s rows and durations (float64), block-permuted then shuffled (one Fisher-Yates draw sequence
    for both: it depends only on the length), cuts over ``max_duration`` left out; and how many were."""
    cap = per_window * block
    rows = np.empty(cap, dtype=np.int64)
    d = np.empty(cap, dtype=np.float64)
    at, dropped = take_window(durations, w, n, block, per_window, permute, block_seed, max_duration, rows, d)
    rows = rows[:at]
    d = d[:at]
    if permute:
        s = mix_step(prefix, np.uint64(w)) & MASK63
        shuffle_from(rows, s)
        shuffle_from(d, s)
    return rows, d, dropped


@njit
def _sub_windows(d: np.ndarray, span: np.float64) -> np.ndarray:
    """Bounds ``[m + 1]`` of ``m = max(1, round(total / span))`` sub-windows of about equal seconds (a cut whose
    running total passes a mark starts the next one); one sub-window when ``span <= 0``."""
    n = d.shape[0]
    total = 0.0
    for i in range(n):
        total += d[i]
    m = np.int64(1)
    if span > 0:
        m = max(np.int64(1), np.int64(np.round(total / span)))
    bounds = np.full(m + 1, n, dtype=np.int64)
    bounds[0] = 0
    j = np.int64(1)
    acc = 0.0
    for i in range(n):
        acc += d[i]
        while j < m and acc > total * j / m:
            bounds[j] = i
            j += 1
    return bounds


@njit
def pack_segments(items: np.ndarray, d: np.ndarray, bounds: np.ndarray, capacity: np.float64, max_items: np.int64,
                  scale: np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing of each segment ``[bounds[s], bounds[s+1])`` of ``items`` (their float64 durations ``d``
    aligned), longest first with ties in the given order: ``(items pack after pack, int64 [P+1] pack offsets)``.
    A bare kernel, shared by ``native.duration.pack_best_fit`` (segments = windows) and the windowed packs
    (segments = sub-windows)."""
    m = items.shape[0]
    size = tree_size(capacity, scale)
    bits = index_new(size)
    head = np.full(size, -1, dtype=np.int64)
    out = np.empty(m, dtype=np.int64)
    offsets = np.empty(m + 1, dtype=np.int64)
    offsets[0] = 0
    pack_of = np.empty(m, dtype=np.int64)
    cnt = np.empty(m, dtype=np.int64)
    sec = np.empty(m, dtype=np.float64)
    total = 0
    keys = np.empty(m, dtype=np.float64)
    seg_all = np.empty(m, dtype=np.int64)
    tk = np.empty(m, dtype=np.float64)
    tr = np.empty(m, dtype=np.int64)
    for a, e in zip(bounds[:-1], bounds[1:]):
        if e == a:
            continue
        dd = keys[: e - a]
        seg = seg_all[: e - a]
        dd[:] = d[a:e]
        seg[:] = items[a:e]
        sort_chunk(dd, seg, True, True, tk, tr)  # longest first; ties keep the given order
        npacks = bfd_kernel(dd, capacity, max_items, scale, bits, size, head, pack_of, cnt, sec)
        pos = np.empty(npacks, dtype=np.int64)
        at = a
        for p in range(npacks):  # items placed pack by pack, in their order within the pack
            pos[p] = at
            at += cnt[p]
            offsets[total + p + 1] = at
        for t in range(e - a):
            p = pack_of[t]
            out[pos[p]] = seg[t]
            pos[p] += 1
        total += npacks
    return out, offsets[: total + 1].copy()


@njit
def _window_packs(durations: np.ndarray, w: np.int64, n: np.int64, block: np.int64, per_window: np.int64,
                  permute: bool, block_seed: np.uint64, prefix: np.uint64, max_duration: np.float64,
                  span: np.float64, max_items: np.int64, scale: np.float64
                  ) -> tuple[np.ndarray, np.ndarray, np.int64]:
    rows, d, dropped = _window_cuts(durations, w, n, block, per_window, permute, block_seed, prefix, max_duration)
    out, offsets = pack_segments(rows, d, _sub_windows(d, span), max_duration, max_items, scale)
    return out, offsets, dropped


@njit(parallel=True)
def _window_sizes(durations: np.ndarray, w0: np.int64, w1: np.int64, n: np.int64, block: np.int64,
                  per_window: np.int64, permute: bool, block_seed: np.uint64, prefix: np.uint64,
                  max_duration: np.float64, span: np.float64, max_items: np.int64, scale: np.float64):
    k = w1 - w0
    cap = per_window * block
    counts = np.zeros(k, dtype=np.int64)
    sizes = np.empty((k, cap), dtype=np.int32)
    stats = np.zeros((k, 3), dtype=np.float64)  # cuts over max_duration, seconds packed, longest pack (s)
    size = tree_size(max_duration, scale)
    lanes = min(k, _LANES)
    for lane in numba.prange(lanes):
        bits = index_new(size)
        head = np.full(size, -1, dtype=np.int64)
        pack_of = np.empty(cap, dtype=np.int64)
        cnt = np.empty(cap, dtype=np.int64)
        sec = np.empty(cap, dtype=np.float64)
        tmp = np.empty(cap, dtype=np.float64)
        no_rows = np.empty(0, dtype=np.int64)
        for i in range(lane, k, lanes):
            _, d, dropped = _window_cuts(durations, w0 + i, n, block, per_window, permute, block_seed, prefix,
                                         max_duration)
            bounds = _sub_windows(d, span)
            nb = 0
            seconds = 0.0
            top = 0.0
            for s in range(bounds.shape[0] - 1):
                a = bounds[s]
                e = bounds[s + 1]
                if e == a:
                    continue
                dd = d[a:e]
                # the durations in the batches' stable descending order (ties are equal values)
                sort_chunk(dd, no_rows, False, True, tmp, no_rows)
                npacks = bfd_kernel(dd, max_duration, max_items, scale, bits, size, head, pack_of, cnt, sec)
                for p in range(npacks):
                    sizes[i, nb + p] = cnt[p]
                    seconds += sec[p]
                    if sec[p] > top:
                        top = sec[p]
                nb += npacks
            counts[i] = nb
            stats[i, 0] = dropped
            stats[i, 1] = seconds
            stats[i, 2] = top
    return counts, sizes, stats


def _args(durations, block, per_window, permute, block_seed, prefix, max_duration, window_seconds, max_cuts,
          resolution):
    if np.ndim(durations) != 1:
        raise ValueError(f"durations must be 1-D (got shape {np.shape(durations)})")
    if block < 1 or per_window < 1:
        raise ValueError(f"block and per_window must be >= 1 (got {block=}, {per_window=})")
    if not (np.isfinite(max_duration) and max_duration > 0):
        raise ValueError(f"max_duration must be a finite number > 0 (got {max_duration=})")
    if max_cuts is not None and max_cuts < 1:
        raise ValueError(f"max_cuts must be >= 1 or None (got {max_cuts=})")
    cap = np.iinfo(np.int64).max if max_cuts is None else int(max_cuts)
    span = 0.0 if window_seconds is None else float(window_seconds)
    return (np.int64(len(durations)), np.int64(block), np.int64(per_window), bool(permute),
            np.uint64(int(block_seed) & 0xFFFFFFFFFFFFFFFF), np.uint64(int(prefix) & 0xFFFFFFFFFFFFFFFF),
            np.float64(max_duration), np.float64(span), np.int64(cap),
            np.float64(pack_scale(float(max_duration), resolution)))


def pack_window_sizes(durations: NDArray, w0: int, w1: int, *, block: int, per_window: int, permute: bool,
                      block_seed: int, prefix: int, max_duration: float, window_seconds: float | None,
                      max_cuts: int | None = None, resolution: float = 1e-3
                      ) -> tuple[list[NDArray[np.int32]], NDArray[np.float64]]:
    """Pack sizes of windows ``[w0, w1)`` (the counting pass; parallel over windows, bitwise reproducible).

    Args:
        durations: float (or integer) ``[N]`` seconds per cut, each finite and ``> 0`` (a memory map is read,
            not copied).
        w0, w1: window range.
        block: rows per block; per_window: blocks per window.
        permute: shuffle (block permutation seeded ``block_seed``, in-window shuffles by ``prefix``); else cuts
            in order.
        block_seed, prefix: the seeds (any integers, taken modulo 2**64).
        max_duration: seconds per pack; longer cuts are left out and counted.
        window_seconds: seconds of audio packed together (``None`` or ``<= 0``: the whole window).
        max_cuts: optional cap on cuts per pack.
        resolution: seconds per key of the remaining-room index (as ``pack_best_fit``'s).

    Returns:
        ``(sizes, stats)``: per window an int32 array of pack sizes (packs as :func:`pack_window_batches` gives
        them), and float64 ``[w1 - w0, 3]``: cuts left out as longer than ``max_duration``, seconds packed and the
        longest pack's seconds, per window.
    """
    a = _args(durations, block, per_window, permute, block_seed, prefix, max_duration, window_seconds, max_cuts,
              resolution)
    counts, sizes, stats = _window_sizes(durations, np.int64(w0), np.int64(w1), *a)
    return [sizes[i, : counts[i]].copy() for i in range(len(counts))], stats


def pack_window_batches(durations: NDArray, w: int, *, block: int, per_window: int, permute: bool, block_seed: int,
                        prefix: int, max_duration: float, window_seconds: float | None,
                        max_cuts: int | None = None, resolution: float = 1e-3
                        ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Rows and pack offsets of window ``w`` (arguments as :func:`pack_window_sizes`).

    Returns:
        ``(rows, offsets)``: int64 rows of the window's packs, pack after pack (longest cut first in each), and
        int64 ``[P_w + 1]`` pack offsets.
    """
    a = _args(durations, block, per_window, permute, block_seed, prefix, max_duration, window_seconds, max_cuts,
              resolution)
    rows, offsets, _ = _window_packs(durations, np.int64(w), *a)
    return rows, offsets


def bfd(durations: NDArray, capacity: float, *, max_items: int | None = None,
        resolution: float = 1e-3) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Best-fit decreasing of ``durations`` taken in the order given (the caller sorts them longest first), with
    the windowed plan's kernel: pack of each item (packs numbered as opened) and items per pack.

    Returns:
        ``(pack_of, sizes)``: int64 ``[N]`` and int64 ``[P]``.
    """
    d = np.ascontiguousarray(durations, dtype=np.float64)
    if not capacity > 0:
        raise ValueError(f"capacity must be > 0 (got {capacity=})")
    if len(d) and d.max() > capacity:
        raise ValueError(f"every duration must be <= capacity={capacity} (longest is {d.max()})")
    cap = np.iinfo(np.int64).max if max_items is None else int(max_items)
    scale = pack_scale(float(capacity), resolution)
    size = int(tree_size(np.float64(capacity), np.float64(scale)))
    bits, head = index_new(np.int64(size)), np.full(size, -1, dtype=np.int64)
    pack_of, cnt, sec = np.empty(len(d), np.int64), np.empty(len(d), np.int64), np.empty(len(d), np.float64)
    npacks = int(bfd_kernel(d, np.float64(capacity), np.int64(cap), np.float64(scale), bits, np.int64(size), head,
                      pack_of, cnt, sec))
    return pack_of, cnt[:npacks].copy()
