"""Windowed epoch-plan kernels for duration-bucketed speech batches (plans above the exact threshold).

The batching of "Training and Inference Efficiency of Encoder-Decoder Speech Models" (Żelasko et al., 2025), as
:mod:`native.duration` computes it for a whole epoch, restated so that one window of rows depends on nothing else:
blocks of contiguous rows are permuted by a stateless Feistel permutation, and each window (a contiguous range of
that block permutation) is shuffled, grouped by duration bucket, sorted in chunks and cut under the padded budget
on its own. Buckets are 1D (duration bounds) or 2D (duration x output tokens, NeMo's rule one cut at a time:
:func:`bucket_2d`); only that step differs. A counting pass (:func:`duration_window_sizes`, parallel over windows)
gives batch sizes and buckets;
:func:`duration_window_batches` gives one window's rows when its batches are needed. Sorting uses an LSD radix sort
of the IEEE bit patterns (several times faster than ``np.sort`` on a bucket's short chunks).

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

__all__ = ["WINDOW_STATS", "bucket_2d", "duration_groups", "duration_window_batches", "duration_window_sizes"]


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
def duration_groups(bin_dur: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(bounds, starts)`` of 2D bins sorted by (duration, tokens): the distinct duration bounds ``[U]`` and the
    first bin of each ``[U + 1]`` (``starts[U] == K``), for :func:`bucket_2d`."""
    k = bin_dur.shape[0]
    bounds = np.empty(k, dtype=np.float64)
    starts = np.empty(k + 1, dtype=np.int64)
    u = 0
    for j in range(k):
        if j == 0 or bin_dur[j] != bin_dur[j - 1]:
            bounds[u] = bin_dur[j]
            starts[u] = j
            u += 1
    starts[u] = k
    return bounds[:u].copy(), starts[: u + 1].copy()


@njit
def bucket_2d(d: np.float64, t: np.float64, bounds: np.ndarray, starts: np.ndarray, bin_tok: np.ndarray,
              strict: bool):
    """``(bucket, promoted)`` of one cut of ``d`` seconds and ``t`` tokens in 2D bins sorted by (duration, tokens)
    (``bounds``/``starts`` from :func:`duration_groups`, ``bin_tok`` the token bounds): the first bin of the first
    duration bound ``>= d`` whose token bound ``>= t``; else ``-1`` with ``strict``, or the next larger bin whose
    token bound holds ``t`` (promoted); ``-1`` when none does. The rule of
    :func:`native.duration.assign_buckets_2d`, one cut at a time, with branch-free counts where it can (a few
    buckets: faster than bisection)."""
    nu = bounds.shape[0]
    u = 0
    for i in range(nu):
        u += bounds[i] < d
    if u == nu:
        return -1, False
    a = starts[u]
    e = starts[u + 1]
    j = a
    for i in range(a, e):  # token bounds ascend within a duration bound
        j += bin_tok[i] < t
    if j < e:
        return j, False
    if strict:
        return -1, False
    k = bin_tok.shape[0]
    while j < k:
        if bin_tok[j] >= t:
            return j, True
        j += 1
    return -1, False


@njit
def _duration_window(dur: np.ndarray, tok: np.ndarray, w: np.int64, n: np.int64, block: np.int64,
                     per_window: np.int64, permute: bool, block_seed: np.uint64, prefix: np.uint64, bins: np.ndarray,
                     bin_tok: np.ndarray, two_d: bool, strict: bool, quad: np.float64, max_duration: np.float64,
                     chunk_rows: np.ndarray, caps: np.ndarray, with_rows: bool):
    """Window ``w``'s batches: rows of permuted blocks ``[w * per_window, (w+1) * per_window)`` within the budget,
    shuffled, grouped by bucket (stable), each bucket sorted in chunks (up, down, ...) and cut under the budget.
    1D buckets (``two_d`` false): ``bins`` are the bounds; without ``with_rows`` only the durations travel (same
    draws, same sorted values: same batch sizes). 2D buckets: ``bins``/``bin_tok`` are the duration and token
    bounds, ``tok`` the output lengths; a payload travels with each duration (its row with ``with_rows``, else its
    tokens, read in the same sequential pass as the duration), moved by the same draws and the same stable sort."""
    nblocks = (n + block - 1) // block
    b0 = w * per_window
    b1 = min(nblocks, b0 + per_window)
    cap = (b1 - b0) * block
    track = with_rows or two_d  # a payload travels: the row, or (2D counting pass) the cut's tokens
    rows = np.empty(cap if with_rows else 0, dtype=np.int64)
    # values are shuffled in the metadata's own dtypes (float32 durations, int32 tokens: half the bytes to move)
    vals = np.empty(cap, dtype=dur.dtype)
    toks = np.empty(cap if two_d and not with_rows else 0, dtype=tok.dtype)
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
                elif two_d:
                    toks[at] = tok[i]
                vals[at] = dur[i]
                at += 1
            else:
                dropped += 1
                dropped_sec += d
    vals = vals[:at]
    if with_rows:
        rows = rows[:at]
    elif two_d:
        toks = toks[:at]
    if permute:
        state = np.empty(1, dtype=np.uint64)
        state[0] = mix_step(prefix, np.uint64(w)) & MASK63
        if with_rows:
            shuffle_inplace(rows, state)
            for t in range(at):
                vals[t] = dur[rows[t]]
        else:
            if two_d:  # the tokens: the same permutation as the durations (the draws depend on the length only)
                same = state.copy()
                shuffle_inplace(toks, same)
            shuffle_inplace(vals, state)
    # stable counting sort by bucket (1D: bucket i holds bins[i-1] < d <= bins[i]; 2D: bucket_2d, -1 left out)
    nbk = bin_tok.shape[0] if two_d else bins.shape[0] + 1
    bk = np.empty(at, dtype=np.int64)
    starts = np.zeros(nbk + 1, dtype=np.int64)
    nbins = bins.shape[0]
    outside = 0
    promoted = 0
    ubounds, ustarts = duration_groups(bins if two_d else bins[:0])
    for t in range(at):
        d = np.float64(vals[t])
        if two_d:
            tk = np.float64(tok[rows[t]]) if with_rows else np.float64(toks[t])
            lo, moved = bucket_2d(d, tk, ubounds, ustarts, bin_tok, strict)
            if lo < 0:
                bk[t] = -1
                outside += 1
                dropped_sec += d
                continue
            promoted += moved
        else:
            lo = 0
            for j in range(nbins):  # branch-free count of the bounds below d (few buckets: faster than bisection)
                lo += bins[j] < d
        bk[t] = lo
        starts[lo + 1] += 1
    for b in range(nbk):
        starts[b + 1] += starts[b]
    kept = starts[nbk]
    pos = starts[:nbk].copy()
    svals = np.empty(kept, dtype=np.float64)
    srows = np.empty(kept if track else 0, dtype=np.int64)
    for t in range(at):
        b = bk[t]
        if b < 0:
            continue
        svals[pos[b]] = np.float64(vals[t])
        if with_rows:
            srows[pos[b]] = rows[t]
        elif two_d:
            srows[pos[b]] = np.int64(toks[t])
        pos[b] += 1
    sizes = np.empty(max(kept, 1), dtype=np.int64)
    groups = np.empty(max(kept, 1), dtype=np.int64)
    tmp = np.empty(kept, dtype=np.float64)
    tmpr = np.empty(kept if track else 0, dtype=np.int64)
    nb = 0
    real = 0.0
    padded = 0.0
    top = 0.0
    real_tok = 0.0
    padded_tok = 0.0
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
                if track:
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
        cur_tok = 0.0
        for t in range(s, e):
            d = svals[t]
            real += d
            if d > top:
                top = d
            m = d if d > cur_max else cur_max
            cost = m + m * m / quad if quad > 0 else m
            tk = 0.0
            if two_d:
                tk = np.float64(tok[srows[t]]) if with_rows else np.float64(srows[t])
            real_tok += tk
            if cur_n > 0 and ((cur_n + 1) * cost > max_duration or cur_n + 1 > capb):
                sizes[nb] = cur_n
                groups[nb] = b
                padded += cur_n * cur_max
                padded_tok += cur_n * cur_tok
                nb += 1
                cur_n = 1
                cur_max = d
                cur_tok = tk
            else:
                cur_n += 1
                cur_max = m
                cur_tok = tk if tk > cur_tok else cur_tok
        sizes[nb] = cur_n
        groups[nb] = b
        padded += cur_n * cur_max
        padded_tok += cur_n * cur_tok
        nb += 1
    stats = np.array([np.float64(dropped), real, padded, dropped_sec, top, np.float64(outside), np.float64(promoted),
                      real_tok, padded_tok])
    return srows if with_rows else srows[:0], sizes[:nb].copy(), groups[:nb].copy(), stats


#: columns of the counting pass's per-window statistics (see :func:`duration_window_sizes`)
WINDOW_STATS = ("dropped_long", "seconds", "padded_seconds", "dropped_seconds", "top", "outside_2d_bins",
                "promoted_2d", "tokens", "padded_tokens")
_NSTATS = len(WINDOW_STATS)


@njit(parallel=True)
def _duration_window_sizes(dur, tok, w0, w1, n, block, per_window, permute, block_seed, prefix, bins, bin_tok, two_d,
                           strict, quad, max_duration, chunk_rows, caps):
    k = w1 - w0
    cap = per_window * block
    ns = _NSTATS
    counts = np.zeros(k, dtype=np.int64)
    sizes = np.zeros((k, cap), dtype=np.int32)
    groups = np.zeros((k, cap), dtype=np.int16)
    stats = np.zeros((k, ns), dtype=np.float64)
    for i in numba.prange(k):
        _, sz, gr, st = _duration_window(dur, tok, w0 + i, n, block, per_window, permute, block_seed, prefix, bins,
                                         bin_tok, two_d, strict, quad, max_duration, chunk_rows, caps, False)
        counts[i] = sz.shape[0]
        for b in range(sz.shape[0]):
            sizes[i, b] = sz[b]
            groups[i, b] = gr[b]
        for j in range(ns):
            stats[i, j] = st[j]
    return counts, sizes, groups, stats


def _window_args(durations, output_lengths, block, per_window, permute, block_seed, prefix, bins, strict_2d,
                 max_duration, quadratic_duration, chunk_rows, caps):
    if block < 1 or per_window < 1:
        raise ValueError(f"block and per_window must be >= 1 (got {block=}, {per_window=})")
    bins = np.asarray(bins, dtype=np.float64)
    two_d = bins.ndim == 2
    if two_d != (output_lengths is not None):
        raise ValueError("2D bins [K, 2] go with output_lengths, 1D bins [K-1] without (got bins of shape "
                         f"{bins.shape} and output_lengths={'given' if output_lengths is not None else None})")
    if two_d:
        if bins.shape[1] != 2:
            raise ValueError(f"2D bins must have shape [K, 2] (got {bins.shape})")
        if len(output_lengths) != len(durations):
            raise ValueError(f"output_lengths must have {len(durations)} rows, one per duration "
                             f"(got {len(output_lengths)})")
        tok, bin_dur, bin_tok = output_lengths, np.ascontiguousarray(bins[:, 0]), np.ascontiguousarray(bins[:, 1])
    else:
        tok, bin_dur, bin_tok = np.zeros(0, np.int32), np.ascontiguousarray(bins), np.zeros(0, np.float64)
    nbk = len(bin_tok) if two_d else len(bins) + 1
    if nbk > 32767:
        raise ValueError(f"windowed duration plans take at most 32767 buckets (got {nbk})")
    q = 0.0 if quadratic_duration is None else float(quadratic_duration)
    return tok, (np.int64(len(durations)), np.int64(block), np.int64(per_window), bool(permute),
                 np.uint64(int(block_seed) & 0xFFFFFFFFFFFFFFFF), np.uint64(int(prefix) & 0xFFFFFFFFFFFFFFFF),
                 bin_dur, bin_tok, two_d, bool(strict_2d), np.float64(q), np.float64(max_duration),
                 np.ascontiguousarray(chunk_rows, dtype=np.int64), np.ascontiguousarray(caps, dtype=np.int64))


def duration_window_sizes(durations: NDArray, w0: int, w1: int, *, block: int, per_window: int, permute: bool,
                          block_seed: int, prefix: int, bins: NDArray, max_duration: float,
                          quadratic_duration: float | None, chunk_rows: NDArray, caps: NDArray,
                          output_lengths: NDArray | None = None, strict_2d: bool = False
                          ) -> tuple[list[NDArray[np.int32]], list[NDArray[np.int16]], NDArray[np.float64]]:
    """Batch sizes and buckets of windows ``[w0, w1)`` (the counting pass; parallel over windows, each window
    computed on its own, so bitwise the same for any thread count).

    A window holds the rows of blocks ``[w * per_window, (w + 1) * per_window)`` of a Feistel permutation of the
    blocks of ``block`` contiguous rows (seed ``block_seed``; identity without ``permute``); rows whose cost is over
    ``max_duration`` are left out; the rest are shuffled (seed ``mix_step(prefix, w)``), grouped by bucket, each
    bucket sorted in chunks of ``chunk_rows[b]`` rows (alternately up and down) and cut greedily under
    ``n * cost(max) <= max_duration`` and ``n <= caps[b]``, as :func:`native.duration.bucket_batches` cuts a
    bucket. The bucket is the 1D bucket of ``bins`` (``[K-1]`` bounds), or with ``output_lengths`` the 2D bucket of
    ``bins`` (``[K, 2]`` rows ``(max_duration, max_tokens)``) by :func:`bucket_2d`: cuts no bucket holds (with
    ``strict_2d``, any whose tokens exceed their duration bin's sub-buckets) are left out and counted.

    Args:
        durations: float ``[N]`` seconds (float32 or float64; a memory map is read, not copied).
        w0, w1: window range.
        output_lengths: int ``[N]`` output tokens per cut (2D buckets; a memory map is read, not copied).
        strict_2d: drop, rather than promote, cuts whose tokens exceed their duration bin's sub-buckets.

    Returns:
        ``(sizes, buckets, stats)``: per window int32 batch sizes and int16 buckets (bucket by bucket, ascending),
        and float64 ``[w1 - w0, 9]`` per window, columns :data:`WINDOW_STATS`: rows dropped as too long, seconds
        kept, padded seconds, seconds dropped, longest duration kept, rows outside the 2D bins, rows promoted to a
        larger 2D bucket, tokens kept, padded tokens (the last four 0 with 1D buckets).
    """
    tok, a = _window_args(durations, output_lengths, block, per_window, permute, block_seed, prefix, bins, strict_2d,
                          max_duration, quadratic_duration, chunk_rows, caps)
    counts, sizes, groups, stats = _duration_window_sizes(durations, tok, np.int64(w0), np.int64(w1), *a)
    return ([sizes[i, : counts[i]].copy() for i in range(len(counts))],
            [groups[i, : counts[i]].copy() for i in range(len(counts))], stats)


def duration_window_batches(durations: NDArray, w: int, *, block: int, per_window: int, permute: bool,
                            block_seed: int, prefix: int, bins: NDArray, max_duration: float,
                            quadratic_duration: float | None, chunk_rows: NDArray, caps: NDArray,
                            output_lengths: NDArray | None = None, strict_2d: bool = False
                            ) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Rows of window ``w``'s batches (arguments as :func:`duration_window_sizes`).

    Returns:
        ``(rows, offsets, buckets)``: int64 rows batch after batch, int64 ``[B_w + 1]`` offsets, int64 ``[B_w]``.
    """
    tok, a = _window_args(durations, output_lengths, block, per_window, permute, block_seed, prefix, bins, strict_2d,
                          max_duration, quadratic_duration, chunk_rows, caps)
    rows, sizes, groups, _ = _duration_window(durations, tok, np.int64(w), *a, True)
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return rows, offsets, groups
