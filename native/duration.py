"""Epoch-plan kernels for duration-bucketed speech batches, and best-fit-decreasing packing.

Implements the batching side of "Training and Inference Efficiency of Encoder-Decoder Speech Models"
(Żelasko et al., 2025): cuts are put in duration buckets (1D) or duration x output-token buckets (2D, as NeMo),
each bucket is shuffled, cut into chunks of several batches, each chunk sorted by duration (alternately up and
down, so a batch spanning two chunks joins their long ends), and batches are cut greedily under the *padded*
budget ``n * cost(max) <= max_duration`` with ``cost(d) = d + d**2 / q`` when a quadratic term is asked for
(the chunk sort and the cut are :mod:`native.sorted_cuts`, shared with the token-budget plans). The padding-free
alternative packs cuts into packs of at most ``capacity`` seconds by best-fit decreasing,
with a segment tree over quantised remaining capacities (``O(n log C)``).

Every kernel takes arrays and scalars and returns arrays; randomness enters as a uint64 seed.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from native._config import njit
from native.buckets import bucket_2d, duration_groups
from native.duration_windows import duration_window_batches, duration_window_sizes
from native.pack_windows import pack_scale, pack_segments
from native.rng import shuffle_inplace
from native.sorted_cuts import sort_cut

__all__ = ["assign_buckets_2d", "bucket_batches", "duration_window_batches", "duration_window_sizes",
           "pack_best_fit"]



# ---------------------------------------------------------------------------------------------------------------
# 2D bucket assignment
# ---------------------------------------------------------------------------------------------------------------
@njit
def _assign_2d(dur: np.ndarray, tok: np.ndarray, bin_dur: np.ndarray, bin_tok: np.ndarray,
               strict: bool) -> tuple[np.ndarray, np.ndarray]:
    n = dur.shape[0]
    bucket = np.empty(n, dtype=np.int64)
    promoted = np.empty(n, dtype=np.bool_)
    bounds, starts = duration_groups(bin_dur)
    for i in range(n):  # the windowed plans' rule, one cut at a time (native.buckets)
        b, moved = bucket_2d(dur[i], tok[i], bounds, starts, bin_tok, strict)
        bucket[i] = b
        promoted[i] = moved
    return bucket, promoted


def assign_buckets_2d(durations: NDArray, tokens: NDArray, bins: NDArray,
                      strict: bool = False) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    """Assign each cut to the smallest 2D bucket ``(max_duration, max_tokens)`` that holds it.

    A cut goes to the bins of the first duration bound ``>= duration``, and among those to the first whose
    token bound ``>= tokens``. When none holds its tokens, ``strict`` drops it (NeMo's strict 2D mode) and
    otherwise it is promoted to the next bucket (larger duration) whose token bound holds it. The rule is
    :func:`native.buckets.bucket_2d`, which the windowed plans apply cut by cut.

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
# within-bucket shuffle, then the shared chunked sort and budget cutting (native.sorted_cuts)
# ---------------------------------------------------------------------------------------------------------------
@njit
def _bucket_batches(rows: np.ndarray, bucket_offsets: np.ndarray, dur: np.ndarray, chunk_rows: np.ndarray,
                    caps: np.ndarray, max_duration: np.float64, quad: np.float64, shuffle: bool,
                    seed: np.uint64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    out = rows.copy()
    if shuffle:  # one draw sequence across the buckets, bucket after bucket
        state = np.empty(1, dtype=np.uint64)
        state[0] = seed
        for b in range(bucket_offsets.shape[0] - 1):
            if bucket_offsets[b + 1] > bucket_offsets[b]:
                shuffle_inplace(out[bucket_offsets[b] : bucket_offsets[b + 1]], state)
    keys = np.empty(out.shape[0], dtype=np.float64)
    for t in range(out.shape[0]):
        keys[t] = dur[out[t]]
    offsets, groups = sort_cut(keys, out, True, bucket_offsets, chunk_rows, True, caps, max_duration, quad)
    return out, offsets, groups


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
# best-fit decreasing packing (the kernel is native.pack_windows.pack_segments, shared with the windowed packs)
# ---------------------------------------------------------------------------------------------------------------
@njit
def _pack(rows: np.ndarray, dur: np.ndarray, window_offsets: np.ndarray, capacity: np.float64,
          max_items: np.int64, scale: np.float64, shuffle: bool, seed: np.uint64
          ) -> tuple[np.ndarray, np.ndarray]:
    items = rows.copy()
    if shuffle:  # random order among equal durations: each window shuffled, one draw sequence across windows
        state = np.empty(1, dtype=np.uint64)
        state[0] = seed
        for w in range(window_offsets.shape[0] - 1):
            s = window_offsets[w]
            e = window_offsets[w + 1]
            if e > s:
                shuffle_inplace(items[s:e], state)
    d = np.empty(items.shape[0], dtype=np.float64)
    for t in range(items.shape[0]):
        d[t] = dur[items[t]]
    return pack_segments(items, d, window_offsets, capacity, max_items, scale)


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
    # at most 2**17 keys (a small index to clear each window); the quantum grows for large capacities
    scale = pack_scale(capacity, resolution)
    return _pack(rows, dur, np.ascontiguousarray(window_offsets, dtype=np.int64), np.float64(capacity),
                 np.int64(cap), np.float64(scale), bool(shuffle), np.uint64(seed & 0xFFFFFFFFFFFFFFFF))
