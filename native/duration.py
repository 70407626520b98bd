"""Epoch-plan kernels for duration-bucketed speech batches, and best-fit-decreasing packing.

Implements the batching side of "Training and Inference Efficiency of Encoder-Decoder Speech Models"
(Żelasko et al., 2025): cuts are put in duration buckets (1D) or duration x output-token buckets (2D, as NeMo),
each bucket is shuffled, cut into chunks of several batches, each chunk sorted by duration (alternately up and
down, so a batch spanning two chunks joins their long ends), and batches are cut greedily under the *padded*
budget ``n * cost(max) <= max_duration`` with ``cost(d) = d + d**2 / q`` when a quadratic term is asked for.
The padding-free alternative packs cuts into packs of at most ``capacity`` seconds by best-fit decreasing,
with a segment tree over quantised remaining capacities (``O(n log C)``).

Every kernel takes arrays and scalars and returns arrays; randomness enters as a uint64 seed.
"""

from __future__ import annotations

import numba
import numpy as np
from numpy.typing import NDArray

from native._config import njit
from native.feistel import feistel_keyed as _feistel_keyed
from native.feistel import half_bits as _half_bits
from native.feistel import round_keys as _round_keys
from native.rng import MASK63, mix_step, shuffle_inplace

__all__ = ["assign_buckets_2d", "bucket_batches", "duration_window_batches", "duration_window_sizes",
           "pack_best_fit"]

_MAX_KEYS = 2**17


# ---------------------------------------------------------------------------------------------------------------
# 2D bucket assignment
# ---------------------------------------------------------------------------------------------------------------
@njit
def _assign_2d(dur: np.ndarray, tok: np.ndarray, bin_dur: np.ndarray, bin_tok: np.ndarray,
               strict: bool) -> tuple[np.ndarray, np.ndarray]:
    n = dur.shape[0]
    k = bin_dur.shape[0]
    bucket = np.full(n, -1, dtype=np.int64)
    promoted = np.zeros(n, dtype=np.bool_)
    for i in range(n):
        d = dur[i]
        t = tok[i]
        # first bin whose duration bound holds d (bins sorted by (duration, tokens))
        lo = 0
        hi = k
        while lo < hi:
            mid = (lo + hi) // 2
            if bin_dur[mid] < d:
                lo = mid + 1
            else:
                hi = mid
        if lo == k:
            continue  # longer than every bin: dropped
        home = bin_dur[lo]
        j = lo
        while j < k and bin_dur[j] == home:
            if bin_tok[j] >= t:
                bucket[i] = j
                break
            j += 1
        if bucket[i] >= 0 or strict:
            continue
        # lenient: promote to the next larger bucket that holds both dimensions
        while j < k:
            if bin_tok[j] >= t:
                bucket[i] = j
                promoted[i] = True
                break
            j += 1
    return bucket, promoted


def assign_buckets_2d(durations: NDArray, tokens: NDArray, bins: NDArray,
                      strict: bool = False) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    """Assign each cut to the smallest 2D bucket ``(max_duration, max_tokens)`` that holds it.

    A cut goes to the bins of the first duration bound ``>= duration``, and among those to the first whose
    token bound ``>= tokens``. When none holds its tokens, ``strict`` drops it (NeMo's strict 2D mode) and
    otherwise it is promoted to the next bucket (larger duration) whose token bound holds it.

    Args:
        durations: float ``[N]`` seconds.
        tokens: integer ``[N]`` output lengths.
        bins: float ``[K, 2]`` bucket bounds sorted by (duration, tokens).
        strict: drop rather than promote.

    Returns:
        ``(bucket, promoted)``: int64 ``[N]`` bucket ids (``-1`` for a dropped cut) and bool ``[N]``.
    """
    bins = np.ascontiguousarray(bins, dtype=np.float64)
    if bins.ndim != 2 or bins.shape[1] != 2:
        raise ValueError(f"bins must have shape [K, 2] (got {bins.shape})")
    return _assign_2d(np.ascontiguousarray(durations, dtype=np.float64),
                      np.ascontiguousarray(tokens, dtype=np.float64),
                      np.ascontiguousarray(bins[:, 0]), np.ascontiguousarray(bins[:, 1]), bool(strict))


# ---------------------------------------------------------------------------------------------------------------
# within-bucket shuffle, chunked sort, budget cutting
# ---------------------------------------------------------------------------------------------------------------
@njit
def _bucket_batches(rows: np.ndarray, bucket_offsets: np.ndarray, dur: np.ndarray, chunk_rows: np.ndarray,
                    caps: np.ndarray, max_duration: np.float64, quad: np.float64, shuffle: bool,
                    seed: np.uint64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = rows.shape[0]
    nbuckets = bucket_offsets.shape[0] - 1
    out = rows.copy()
    offsets = np.empty(n + 1, dtype=np.int64)
    groups = np.empty(n, dtype=np.int64)
    offsets[0] = 0
    nb = 0
    state = np.empty(1, dtype=np.uint64)
    state[0] = seed
    for b in range(nbuckets):
        s = bucket_offsets[b]
        e = bucket_offsets[b + 1]
        if e == s:
            continue
        seg = out[s:e]
        if shuffle:
            shuffle_inplace(seg, state)
        w = chunk_rows[b]
        if w > 1:
            c = 0
            for cs in range(0, e - s, w):
                ce = min(cs + w, e - s)
                chunk = seg[cs:ce].copy()
                keys = dur[chunk]
                if c % 2 == 1:
                    keys = -keys
                order = np.argsort(keys, kind="mergesort")
                for t in range(ce - cs):
                    seg[cs + t] = chunk[order[t]]
                c += 1
        # greedy cut under the padded budget
        cap = caps[b]
        cur_n = 0
        cur_max = 0.0
        for t in range(e - s):
            d = dur[seg[t]]
            m = d if d > cur_max else cur_max
            cost = m + m * m / quad if quad > 0 else m
            if cur_n > 0 and ((cur_n + 1) * cost > max_duration or cur_n + 1 > cap):
                nb += 1
                offsets[nb] = s + t
                groups[nb - 1] = b
                cur_n = 1
                cur_max = d
            else:
                cur_n += 1
                cur_max = m
        nb += 1
        offsets[nb] = e
        groups[nb - 1] = b
    return out, offsets[: nb + 1].copy(), groups[:nb].copy()


def bucket_batches(rows: NDArray[np.int64], bucket_offsets: NDArray[np.int64], durations: NDArray,
                   chunk_rows: NDArray[np.int64], caps: NDArray[np.int64], max_duration: float,
                   quadratic_duration: float | None, shuffle: bool, seed: int
                   ) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Cut every bucket's rows into batches under the padded budget.

    Bucket ``b`` is ``rows[bucket_offsets[b]:bucket_offsets[b+1]]``. Each bucket is shuffled (seeded), cut into
    chunks of ``chunk_rows[b]`` rows, each chunk sorted by duration (ascending, descending, ascending, ...),
    then batches are cut greedily: a batch of ``n`` rows with longest duration ``m`` keeps
    ``n * (m + m**2 / q) <= max_duration`` (``q`` = ``quadratic_duration``, term absent when ``None``) and
    ``n <= caps[b]``. A single row over the budget forms a batch of its own (callers drop such rows first).

    Args:
        rows: int64 ``[N]`` row ids, grouped by bucket.
        bucket_offsets: int64 ``[K+1]`` bucket boundaries in ``rows``.
        durations: float ``[num_rows]`` seconds of every row (indexed by row id).
        chunk_rows: int64 ``[K]`` rows per sorted chunk (``<= 1``: no sorting).
        caps: int64 ``[K]`` maximum rows per batch in each bucket.
        max_duration: padded budget in seconds (``inf`` for none).
        quadratic_duration: ``q`` of the quadratic cost, or ``None``.
        shuffle: shuffle each bucket before chunking.
        seed: integer seed.

    Returns:
        ``(indices, offsets, groups)``: int64 ``[N]`` rows batch after batch, int64 ``[B+1]`` batch offsets,
        int64 ``[B]`` bucket of each batch (batches are emitted bucket by bucket).
    """
    q = 0.0 if quadratic_duration is None else float(quadratic_duration)
    return _bucket_batches(np.ascontiguousarray(rows, dtype=np.int64),
                           np.ascontiguousarray(bucket_offsets, dtype=np.int64),
                           np.ascontiguousarray(durations, dtype=np.float64),
                           np.ascontiguousarray(chunk_rows, dtype=np.int64),
                           np.ascontiguousarray(caps, dtype=np.int64), np.float64(max_duration), np.float64(q),
                           bool(shuffle), np.uint64(seed & 0xFFFFFFFFFFFFFFFF))


# ---------------------------------------------------------------------------------------------------------------
# best-fit decreasing packing
# ---------------------------------------------------------------------------------------------------------------
@njit
def _tree_add(tree: np.ndarray, size: np.int64, leaf: np.int64, delta: np.int64) -> None:
    i = leaf + size
    while i >= 1:
        tree[i] += delta
        i //= 2


@njit
def _tree_first_at_or_after(tree: np.ndarray, size: np.int64, q: np.int64) -> np.int64:
    # smallest leaf index >= q with a non-zero count, or -1
    if q >= size:
        return -1
    i = q + size
    if tree[i] > 0:
        return q
    while i > 1:
        if i % 2 == 0 and tree[i + 1] > 0:
            i = i + 1
            while i < size:
                i = 2 * i if tree[2 * i] > 0 else 2 * i + 1
            return i - size
        i //= 2
    return -1


@njit
def _pack_window(items: np.ndarray, dur: np.ndarray, capacity: np.float64, max_items: np.int64,
                 scale: np.float64, tree: np.ndarray, size: np.int64, head: np.ndarray,
                 pack_of: np.ndarray) -> np.int64:
    """Best-fit decreasing of ``items`` (sorted by decreasing duration); returns the number of packs."""
    n = items.shape[0]
    rem = np.empty(n, dtype=np.float64)
    cnt = np.zeros(n, dtype=np.int64)
    nxt = np.full(n, -1, dtype=np.int64)
    key_of = np.full(n, -1, dtype=np.int64)
    in_tree = np.zeros(n, dtype=np.bool_)
    npacks = 0
    for t in range(n):
        d = dur[items[t]]
        need = np.int64(np.ceil(d * scale))
        leaf = _tree_first_at_or_after(tree, size, need)
        if leaf >= 0:
            p = head[leaf]
            head[leaf] = nxt[p]
            in_tree[p] = False
            _tree_add(tree, size, leaf, -1)
        else:
            p = npacks
            npacks += 1
            rem[p] = capacity
        rem[p] -= d
        cnt[p] += 1
        pack_of[t] = p
        if cnt[p] < max_items:
            key = np.int64(np.floor(rem[p] * scale))
            if key >= 0:
                key_of[p] = key
                nxt[p] = head[key]
                head[key] = p
                in_tree[p] = True
                _tree_add(tree, size, key, 1)
    # leave the tree and the list heads empty for the next window
    for p in range(npacks):
        if in_tree[p]:
            _tree_add(tree, size, key_of[p], -1)
            head[key_of[p]] = -1
    return npacks


@njit
def _pack(rows: np.ndarray, dur: np.ndarray, window_offsets: np.ndarray, capacity: np.float64,
          max_items: np.int64, scale: np.float64, shuffle: bool, seed: np.uint64
          ) -> tuple[np.ndarray, np.ndarray]:
    n = rows.shape[0]
    nleaves = np.int64(np.floor(capacity * scale)) + 1
    size = np.int64(1)
    while size < nleaves:
        size *= 2
    tree = np.zeros(2 * size, dtype=np.int64)
    head = np.full(size, -1, dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    offsets = np.empty(n + 1, dtype=np.int64)
    offsets[0] = 0
    total = 0
    state = np.empty(1, dtype=np.uint64)
    state[0] = seed
    for w in range(window_offsets.shape[0] - 1):
        s = window_offsets[w]
        e = window_offsets[w + 1]
        if e == s:
            continue
        items = rows[s:e].copy()
        if shuffle:
            shuffle_inplace(items, state)  # random order among equal durations
        order = np.argsort(-dur[items], kind="mergesort")
        items = items[order]
        pack_of = np.empty(e - s, dtype=np.int64)
        npacks = _pack_window(items, dur, capacity, max_items, scale, tree, size, head, pack_of)
        # counting sort of the window's items by pack
        counts = np.zeros(npacks + 1, dtype=np.int64)
        for t in range(e - s):
            counts[pack_of[t] + 1] += 1
        for p in range(npacks):
            counts[p + 1] += counts[p]
        pos = counts[:npacks].copy()
        for t in range(e - s):
            p = pack_of[t]
            out[s + pos[p]] = items[t]
            pos[p] += 1
        for p in range(npacks):
            offsets[total + p + 1] = s + counts[p + 1]
        total += npacks
    return out, offsets[: total + 1].copy()


def pack_best_fit(rows: NDArray[np.int64], durations: NDArray, capacity: float, *,
                  window_offsets: NDArray[np.int64] | None = None, max_items: int | None = None,
                  shuffle: bool = False, seed: int = 0, resolution: float = 1e-3
                  ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Pack rows into packs of total duration ``<= capacity`` by best-fit decreasing.

    Within each window ``rows[window_offsets[w]:window_offsets[w+1]]`` rows are taken longest first and each
    goes to the open pack with the least remaining room that still holds it (remaining room is rounded down to
    ``resolution`` seconds, so a fit is never overstated), else to a new pack. Packs never span windows.

    Args:
        rows: int64 ``[N]`` row ids.
        durations: float ``[num_rows]`` seconds, each ``<= capacity`` for the rows given.
        capacity: seconds per pack, ``> 0``.
        window_offsets: int64 ``[W+1]`` window boundaries in ``rows``; default one window.
        max_items: optional cap on rows per pack.
        shuffle: shuffle each window first (ties then break at random).
        seed: integer seed.
        resolution: seconds per step of the remaining-room key (coarser when ``capacity / resolution`` would
            exceed 131072 keys: 600 s packs use 4.6 ms steps).

    Returns:
        ``(indices, offsets)``: int64 ``[N]`` rows pack after pack, int64 ``[P+1]`` pack offsets.
    """
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    dur = np.ascontiguousarray(durations, dtype=np.float64)
    if not capacity > 0:
        raise ValueError(f"capacity must be > 0 (got {capacity=})")
    if len(rows) and dur[rows].max() > capacity:
        raise ValueError(f"every row must be <= capacity={capacity} (longest is {dur[rows].max()})")
    if window_offsets is None:
        window_offsets = np.array([0, len(rows)], dtype=np.int64)
    cap = np.iinfo(np.int64).max if max_items is None else int(max_items)
    if cap < 1:
        raise ValueError(f"max_items must be >= 1 (got {max_items=})")
    # at most 2**17 keys (a small tree to clear each epoch); the quantum grows for large capacities
    scale = min(1.0 / resolution, float(_MAX_KEYS) / capacity)
    return _pack(rows, dur, np.ascontiguousarray(window_offsets, dtype=np.int64), np.float64(capacity),
                 np.int64(cap), np.float64(scale), bool(shuffle), np.uint64(seed & 0xFFFFFFFFFFFFFFFF))


# ---------------------------------------------------------------------------------------------------------------
# windowed bucket batches (plans above the exact threshold: one window of rows depends on nothing else)
# ---------------------------------------------------------------------------------------------------------------
@njit
def _sort_positive(a: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """``np.sort`` of positive finite float64 values, several times faster on the short chunks of a bucket: an LSD
    radix sort (8-bit digits) of the upper 32 bits of the IEEE pattern (monotone for positive values), then an
    insertion pass that orders values sharing those bits (none when they came from float32). Sorts ``a`` in
    place (``tmp`` is scratch of at least ``len(a)``) and returns it."""
    n = a.shape[0]
    if n < 2:
        return a
    bits = a.view(np.uint64)
    src = a
    dst = tmp[:n]
    hist = np.zeros((4, 257), dtype=np.int64)
    passes = 0
    for i in range(n):
        k = bits[i] >> np.uint64(32)
        for p in range(4):
            hist[p, ((k >> np.uint64(8 * p)) & np.uint64(255)) + 1] += 1
    for p in range(4):
        if hist[p, 1:].max() == n:
            continue  # every value shares this digit
        for d in range(256):
            hist[p, d + 1] += hist[p, d]
        sb = src.view(np.uint64)
        for i in range(n):
            dg = ((sb[i] >> np.uint64(32 + 8 * p)) & np.uint64(255))
            dst[hist[p, dg]] = src[i]
            hist[p, dg] += 1
        src, dst = dst, src
        passes += 1
    if passes % 2 == 1:  # the sorted values are in the scratch
        a[:] = src
    for i in range(1, n):  # ties of the upper bits: few or none
        v = a[i]
        j = i - 1
        while j >= 0 and a[j] > v:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = v
    return a


@njit
def _sort_pairs(vals: np.ndarray, rows: np.ndarray, tv: np.ndarray, tr: np.ndarray, descending: bool) -> None:
    """Stable sort of positive finite ``vals`` (ascending, or descending), ``rows`` moved alongside: the order of
    ``np.argsort(vals or -vals, kind="mergesort")``. LSD radix (8-bit digits) of the upper 32 bits of the IEEE
    pattern (complemented when descending), then a stable insertion pass for values sharing those bits."""
    n = vals.shape[0]
    if n < 2:
        return
    flip = np.uint64(0xFFFFFFFF) if descending else np.uint64(0)
    hist = np.zeros((4, 257), dtype=np.int64)
    bits = vals.view(np.uint64)
    for i in range(n):
        k = (bits[i] >> np.uint64(32)) ^ flip
        for p in range(4):
            hist[p, ((k >> np.uint64(8 * p)) & np.uint64(255)) + 1] += 1
    sv, sr, dv, dr = vals, rows, tv[:n], tr[:n]
    passes = 0
    for p in range(4):
        if hist[p, 1:].max() == n:
            continue
        for d in range(256):
            hist[p, d + 1] += hist[p, d]
        sb = sv.view(np.uint64)
        for i in range(n):
            dg = (((sb[i] >> np.uint64(32)) ^ flip) >> np.uint64(8 * p)) & np.uint64(255)
            at = hist[p, dg]
            dv[at] = sv[i]
            dr[at] = sr[i]
            hist[p, dg] = at + 1
        sv, sr, dv, dr = dv, dr, sv, sr
        passes += 1
    if passes % 2 == 1:
        vals[:] = sv
        rows[:] = sr
    for i in range(1, n):
        v = vals[i]
        r = rows[i]
        j = i - 1
        while j >= 0 and ((vals[j] < v) if descending else (vals[j] > v)):
            vals[j + 1] = vals[j]
            rows[j + 1] = rows[j]
            j -= 1
        vals[j + 1] = v
        rows[j + 1] = r


@njit
def _duration_window(dur: np.ndarray, w: np.int64, n: np.int64, block: np.int64, per_window: np.int64,
                     permute: bool, block_seed: np.uint64, prefix: np.uint64, bins: np.ndarray, quad: np.float64,
                     max_duration: np.float64, chunk_rows: np.ndarray, caps: np.ndarray, with_rows: bool):
    """Window ``w``'s batches: rows of permuted blocks ``[w * per_window, (w+1) * per_window)`` within the budget,
    shuffled, grouped by bucket (stable), each bucket sorted in chunks (up, down, ...) and cut under the budget.
    Without ``with_rows`` only the durations travel (same draws, same sorted values: same batch sizes)."""
    nblocks = (n + block - 1) // block
    b0 = w * per_window
    b1 = min(nblocks, b0 + per_window)
    cap = (b1 - b0) * block
    rows = np.empty(cap if with_rows else 0, dtype=np.int64)
    vals = np.empty(cap, dtype=np.float64)
    h = _half_bits(nblocks) if nblocks > 1 else np.int64(1)
    keys = _round_keys(block_seed)
    at = 0
    dropped = 0
    dropped_sec = 0.0
    for k in range(b0, b1):
        blk = _feistel_keyed(k, nblocks, h, keys) if permute and nblocks > 1 else k
        lo = blk * block
        hi = min(n, lo + block)
        for i in range(lo, hi):
            d = np.float64(dur[i])
            c = d + d * d / quad if quad > 0 else d
            if c <= max_duration:
                if with_rows:
                    rows[at] = i
                vals[at] = d
                at += 1
            else:
                dropped += 1
                dropped_sec += d
    vals = vals[:at]
    if with_rows:
        rows = rows[:at]
    if permute:
        state = np.empty(1, dtype=np.uint64)
        state[0] = mix_step(prefix, np.uint64(w)) & MASK63
        if with_rows:
            shuffle_inplace(rows, state)
            for t in range(at):
                vals[t] = np.float64(dur[rows[t]])
        else:
            shuffle_inplace(vals, state)
    # stable counting sort by bucket (bucket i holds bins[i-1] < d <= bins[i])
    nbk = bins.shape[0] + 1
    bk = np.empty(at, dtype=np.int64)
    starts = np.zeros(nbk + 1, dtype=np.int64)
    nbins = bins.shape[0]
    for t in range(at):
        d = vals[t]
        lo = 0
        for j in range(nbins):  # branch-free count of the bounds below d (few buckets: faster than bisection)
            lo += bins[j] < d
        bk[t] = lo
        starts[lo + 1] += 1
    for b in range(nbk):
        starts[b + 1] += starts[b]
    pos = starts[:nbk].copy()
    svals = np.empty(at, dtype=np.float64)
    srows = np.empty(at if with_rows else 0, dtype=np.int64)
    for t in range(at):
        b = bk[t]
        svals[pos[b]] = vals[t]
        if with_rows:
            srows[pos[b]] = rows[t]
        pos[b] += 1
    sizes = np.empty(max(at, 1), dtype=np.int64)
    groups = np.empty(max(at, 1), dtype=np.int64)
    tmp = np.empty(at, dtype=np.float64)
    tmpr = np.empty(at if with_rows else 0, dtype=np.int64)
    nb = 0
    real = 0.0
    padded = 0.0
    top = 0.0
    for b in range(nbk):
        s = starts[b]
        e = starts[b + 1]
        if e == s:
            continue
        cw = chunk_rows[b]
        if cw > 1:
            c = 0
            for cs in range(s, e, cw):
                ce = min(cs + cw, e)
                if with_rows:
                    _sort_pairs(svals[cs:ce], srows[cs:ce], tmp, tmpr, c % 2 == 1)
                else:
                    _sort_positive(svals[cs:ce], tmp)
                    if c % 2 == 1:
                        m = ce - cs
                        for t in range(m // 2):
                            x = svals[cs + t]
                            svals[cs + t] = svals[ce - 1 - t]
                            svals[ce - 1 - t] = x
                c += 1
        capb = caps[b]
        cur_n = 0
        cur_max = 0.0
        for t in range(s, e):
            d = svals[t]
            real += d
            if d > top:
                top = d
            m = d if d > cur_max else cur_max
            cost = m + m * m / quad if quad > 0 else m
            if cur_n > 0 and ((cur_n + 1) * cost > max_duration or cur_n + 1 > capb):
                sizes[nb] = cur_n
                groups[nb] = b
                padded += cur_n * cur_max
                nb += 1
                cur_n = 1
                cur_max = d
            else:
                cur_n += 1
                cur_max = m
        sizes[nb] = cur_n
        groups[nb] = b
        padded += cur_n * cur_max
        nb += 1
    stats = np.array([np.float64(dropped), real, padded, dropped_sec, top])
    return srows, sizes[:nb].copy(), groups[:nb].copy(), stats


@njit(parallel=True)
def _duration_window_sizes(dur, w0, w1, n, block, per_window, permute, block_seed, prefix, bins, quad, max_duration,
                           chunk_rows, caps):
    k = w1 - w0
    cap = per_window * block
    counts = np.zeros(k, dtype=np.int64)
    sizes = np.zeros((k, cap), dtype=np.int32)
    groups = np.zeros((k, cap), dtype=np.int16)
    stats = np.zeros((k, 5), dtype=np.float64)
    for i in numba.prange(k):
        _, sz, gr, st = _duration_window(dur, w0 + i, n, block, per_window, permute, block_seed, prefix, bins, quad,
                                         max_duration, chunk_rows, caps, False)
        counts[i] = sz.shape[0]
        for b in range(sz.shape[0]):
            sizes[i, b] = sz[b]
            groups[i, b] = gr[b]
        for j in range(5):
            stats[i, j] = st[j]
    return counts, sizes, groups, stats


def _window_args(n, block, per_window, permute, block_seed, prefix, bins, max_duration, quadratic_duration,
                 chunk_rows, caps):
    if block < 1 or per_window < 1:
        raise ValueError(f"block and per_window must be >= 1 (got {block=}, {per_window=})")
    bins = np.ascontiguousarray(bins, dtype=np.float64)
    if len(bins) + 1 > 32767:
        raise ValueError(f"windowed duration plans take at most 32767 buckets (got {len(bins) + 1})")
    q = 0.0 if quadratic_duration is None else float(quadratic_duration)
    return (np.int64(n), np.int64(block), np.int64(per_window), bool(permute),
            np.uint64(int(block_seed) & 0xFFFFFFFFFFFFFFFF), np.uint64(int(prefix) & 0xFFFFFFFFFFFFFFFF), bins,
            np.float64(q), np.float64(max_duration), np.ascontiguousarray(chunk_rows, dtype=np.int64),
            np.ascontiguousarray(caps, dtype=np.int64))


def duration_window_sizes(durations: NDArray, w0: int, w1: int, *, block: int, per_window: int, permute: bool,
                          block_seed: int, prefix: int, bins: NDArray, max_duration: float,
                          quadratic_duration: float | None, chunk_rows: NDArray, caps: NDArray
                          ) -> tuple[list[NDArray[np.int32]], list[NDArray[np.int16]], NDArray[np.float64]]:
    """Batch sizes and buckets of windows ``[w0, w1)`` (the counting pass; parallel over windows, each window
    computed on its own, so bitwise the same for any thread count).

    A window holds the rows of blocks ``[w * per_window, (w + 1) * per_window)`` of a Feistel permutation of the
    blocks of ``block`` contiguous rows (seed ``block_seed``; identity without ``permute``); rows whose cost is over
    ``max_duration`` are left out; the rest are shuffled (seed ``mix_step(prefix, w)``), grouped by 1D bucket
    (``bins``), each bucket sorted in chunks of ``chunk_rows[b]`` rows (alternately up and down) and cut greedily
    under ``n * cost(max) <= max_duration`` and ``n <= caps[b]``, as :func:`bucket_batches` cuts a bucket.

    Args:
        durations: float ``[N]`` seconds (float32 or float64; a memory map is read, not copied).
        w0, w1: window range.

    Returns:
        ``(sizes, buckets, stats)``: per window int32 batch sizes and int16 buckets (bucket by bucket, ascending),
        and float64 ``[w1 - w0, 5]`` (rows dropped as too long, seconds kept, padded seconds, seconds dropped,
        longest duration kept) per window.
    """
    a = _window_args(len(durations), block, per_window, permute, block_seed, prefix, bins, max_duration,
                     quadratic_duration, chunk_rows, caps)
    counts, sizes, groups, stats = _duration_window_sizes(durations, np.int64(w0), np.int64(w1), *a)
    return ([sizes[i, : counts[i]].copy() for i in range(len(counts))],
            [groups[i, : counts[i]].copy() for i in range(len(counts))], stats)


def duration_window_batches(durations: NDArray, w: int, *, block: int, per_window: int, permute: bool,
                            block_seed: int, prefix: int, bins: NDArray, max_duration: float,
                            quadratic_duration: float | None, chunk_rows: NDArray, caps: NDArray
                            ) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Rows of window ``w``'s batches (arguments as :func:`duration_window_sizes`).

    Returns:
        ``(rows, offsets, buckets)``: int64 rows batch after batch, int64 ``[B_w + 1]`` offsets, int64 ``[B_w]``.
    """
    a = _window_args(len(durations), block, per_window, permute, block_seed, prefix, bins, max_duration,
                     quadratic_duration, chunk_rows, caps)
    rows, sizes, groups, _ = _duration_window(durations, np.int64(w), *a, True)
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return rows, offsets, groups
