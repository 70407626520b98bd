"""Windowed epoch-plan kernels for duration-bucketed speech batches (plans above the exact threshold).

The batching of "Training and Inference Efficiency of Encoder-Decoder Speech Models" (Żelasko et al., 2025), as
:mod:`native.duration` computes it for a whole epoch, restated so that one window of rows depends on nothing else:
blocks of contiguous rows are permuted by a stateless Feistel permutation, and each window (a contiguous range of
that block permutation) is shuffled, grouped by duration bucket, sorted in chunks and cut under the padded budget
on its own. Buckets are 1D (duration bounds) or 2D (duration x output tokens, NeMo's rule one cut at a time);
only that step differs, and it is the exact plan's lookup (:mod:`native.buckets`). The chunk sort and the cut are
:func:`native.sorted_cuts.sort_cut`, the exact plans' kernel. A counting pass (:func:`duration_window_sizes`,
parallel over windows) gives batch sizes and buckets; :func:`duration_window_batches` gives one window's rows when
its batches are needed.

Every kernel takes arrays and scalars and returns arrays; randomness enters as a uint64 seed.
"""

from __future__ import annotations

import numba
import numpy as np
from numpy.typing import NDArray

from native._config import njit
from native.buckets import bucket_1d, bucket_2d, duration_groups
from native.feistel import feistel_keyed as _feistel_keyed
from native.feistel import half_bits as _half_bits
from native.feistel import round_keys as _round_keys
from native.rng import MASK63, mix_step, shuffle_inplace
from native.sorted_cuts import sort_cut

__all__ = ["WINDOW_STATS", "duration_window_batches", "duration_window_sizes"]


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
            lo = bucket_1d(d, bins)
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
    # the shared chunk sort (up, down, ...) and cut (native.sorted_cuts), then the batches' statistics in order
    offsets, groups = sort_cut(svals, srows, track, starts, chunk_rows, True, caps, max_duration, quad)
    nb = offsets.shape[0] - 1
    real = 0.0
    padded = 0.0
    top = 0.0
    real_tok = 0.0
    padded_tok = 0.0
    for j in range(nb):
        cur_max = 0.0
        cur_tok = 0.0
        for t in range(offsets[j], offsets[j + 1]):
            d = svals[t]
            real += d
            top = d if d > top else top
            cur_max = d if d > cur_max else cur_max
            if two_d:
                tk = np.float64(tok[srows[t]]) if with_rows else np.float64(srows[t])
                real_tok += tk
                cur_tok = tk if tk > cur_tok else cur_tok
        padded += (offsets[j + 1] - offsets[j]) * cur_max
        padded_tok += (offsets[j + 1] - offsets[j]) * cur_tok
    stats = np.array([np.float64(dropped), real, padded, dropped_sec, top, np.float64(outside), np.float64(promoted),
                      real_tok, padded_tok])
    return srows if with_rows else srows[:0], np.diff(offsets), groups, stats


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
    ``bins`` (``[K, 2]`` rows ``(max_duration, max_tokens)``) by :func:`native.buckets.bucket_2d`: cuts no bucket holds (with
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
