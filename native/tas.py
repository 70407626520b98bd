"""Kernels of TAS-Balanced: per-query margin bins and vectorised balanced pair draws.

"Efficiently Teaching an Effective Dense Retriever with Balanced Topic Aware Sampling" (Hofstätter, Lin, Yang,
Lin and Hanbury, SIGIR 2021). Each query has (positive, negative) passage pairs with teacher margins
``s_pos - s_neg``; the margins of one query are split into ``num_bins`` equal-width bins between that query's
minimum and maximum, and a training pair is drawn by picking a *non-empty* bin uniformly, then a pair uniformly
inside it. The reference loader re-draws empty bins in a Python ``while`` loop and fails when all of a query's
margins are equal; here the non-empty bins are precomputed once (:func:`bin_table`) so a draw is two counter-based
random numbers per query (:func:`draw_pairs`), and equal margins put every pair in bin 0.

At 1e9 queries the per-pair tables above are out of reach (O(pairs) in RAM); :func:`draw_own_pairs` makes the
same draw for a batch's queries from each query's own pairs (its bins computed on the spot, read through memory
maps), so a batch's pairs depend on nothing else.

Pair tables are CSR: the pairs of query ``q`` are rows ``offsets[q]:offsets[q+1]``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from native._config import njit
from native.rng import SPLITMIX_M1, splitmix64

__all__ = ["bin_table", "draw_own_pairs", "draw_pairs", "margin_bins"]


@njit
def _margin_bins(offsets: np.ndarray, margin: np.ndarray, num_bins: np.int64) -> np.ndarray:
    out = np.zeros(margin.shape[0], dtype=np.int64)
    for q in range(offsets.shape[0] - 1):
        a, b = offsets[q], offsets[q + 1]
        if b <= a:
            continue
        lo = margin[a]
        hi = margin[a]
        for r in range(a + 1, b):
            if margin[r] < lo:
                lo = margin[r]
            if margin[r] > hi:
                hi = margin[r]
        width = hi - lo
        if width <= 0.0:
            continue  # equal margins: every pair in bin 0
        for r in range(a, b):
            k = np.int64(np.floor((margin[r] - lo) / width * num_bins))
            out[r] = min(max(k, 0), num_bins - 1)
    return out


def margin_bins(offsets: NDArray[np.int64], margin: NDArray[np.float64], num_bins: int) -> NDArray[np.int64]:
    """Bin of every pair among its query's ``num_bins`` equal-width margin bins.

    Bin ``k`` of query ``q`` holds margins in ``[lo + k w, lo + (k+1) w)`` with ``lo``/``hi`` the query's
    min/max margin and ``w = (hi - lo) / num_bins``; the maximum goes to the last bin. When all margins of a
    query are equal every pair is in bin 0.

    Args:
        offsets: int64 ``[Q+1]`` CSR offsets (validated by the caller).
        margin: float64 ``[P]`` finite margins.
        num_bins: ``>= 1``.

    Returns:
        int64 ``[P]`` with values in ``[0, num_bins)``.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1 (got {num_bins=})")
    return _margin_bins(np.ascontiguousarray(offsets, dtype=np.int64),
                        np.ascontiguousarray(margin, dtype=np.float64), np.int64(num_bins))


@njit
def _bin_table(offsets: np.ndarray, bins: np.ndarray, num_bins: np.int64):
    nq = offsets.shape[0] - 1
    npairs = bins.shape[0]
    sorted_rows = np.empty(npairs, dtype=np.int64)
    qbin_off = np.zeros(nq + 1, dtype=np.int64)
    bin_start = np.empty(npairs, dtype=np.int64)  # at most one non-empty bin per pair
    bin_count = np.empty(npairs, dtype=np.int64)
    bin_id = np.empty(npairs, dtype=np.int64)
    counts = np.zeros(num_bins, dtype=np.int64)
    e = 0
    for q in range(nq):
        a, b = offsets[q], offsets[q + 1]
        counts[:] = 0
        for r in range(a, b):
            counts[bins[r]] += 1
        pos = a
        for k in range(num_bins):
            if counts[k] > 0:
                bin_start[e] = pos
                bin_count[e] = counts[k]
                bin_id[e] = k
                e += 1
            c = counts[k]
            counts[k] = pos  # becomes the write cursor of bin k
            pos += c
        for r in range(a, b):  # stable counting sort: rows keep their order inside a bin
            sorted_rows[counts[bins[r]]] = r
            counts[bins[r]] += 1
        qbin_off[q + 1] = e
    return sorted_rows, qbin_off, bin_start[:e].copy(), bin_count[:e].copy(), bin_id[:e].copy()


def bin_table(offsets: NDArray[np.int64], bins: NDArray[np.int64], num_bins: int):
    """The non-empty margin bins of every query, for O(1) balanced draws.

    Args:
        offsets: int64 ``[Q+1]`` CSR offsets of the pair table.
        bins: int64 ``[P]`` bin of each pair (:func:`margin_bins`).
        num_bins: ``>= 1``.

    Returns:
        ``(sorted_rows, qbin_off, bin_start, bin_count, bin_id)``: ``sorted_rows`` int64 ``[P]`` are the pair
        rows ordered by (query, bin), stable; the non-empty bins of query ``q`` are entries
        ``qbin_off[q]:qbin_off[q+1]`` (int64 ``[Q+1]``) of ``bin_start`` (position in ``sorted_rows``),
        ``bin_count`` (pairs in the bin, ``>= 1``) and ``bin_id`` (the bin number), each int64 ``[E]``.
    """
    bins = np.ascontiguousarray(bins, dtype=np.int64)
    if len(bins) and (bins.min() < 0 or bins.max() >= num_bins):
        raise ValueError(f"bins must lie in [0, {num_bins}) (got min {bins.min()}, max {bins.max()})")
    return _bin_table(np.ascontiguousarray(offsets, dtype=np.int64), bins, np.int64(num_bins))


@njit
def _draw_pairs(queries, offsets, qbin_off, bin_start, bin_count, sorted_rows, seed, balanced):
    n = queries.shape[0]
    out = np.empty(n, dtype=np.int64)
    state = np.empty(1, dtype=np.uint64)
    for i in range(n):
        q = queries[i]
        # counter-based: the draw of query q depends only on (seed, q), not on where q sits in the epoch
        state[0] = seed ^ (np.uint64(q) * SPLITMIX_M1)
        r1 = splitmix64(state) >> np.uint64(32)
        r2 = splitmix64(state) >> np.uint64(32)
        if balanced:
            a = qbin_off[q]
            nb = qbin_off[q + 1] - a
            e = a + np.int64((r1 * np.uint64(nb)) >> np.uint64(32))
            j = np.int64((r2 * np.uint64(bin_count[e])) >> np.uint64(32))
            out[i] = sorted_rows[bin_start[e] + j]
        else:
            a = offsets[q]
            npq = offsets[q + 1] - a
            out[i] = a + np.int64((r1 * np.uint64(npq)) >> np.uint64(32))
    return out


def draw_pairs(queries: NDArray[np.int64], offsets: NDArray[np.int64], table, seed: int, *,
               balanced: bool = True) -> NDArray[np.int64]:
    """One pair-table row per query: balanced over non-empty margin bins, or uniform over the query's pairs.

    Args:
        queries: int64 ``[n]`` query indices; every one must have at least one pair.
        offsets: int64 ``[Q+1]`` CSR offsets of the pair table.
        table: the tuple returned by :func:`bin_table` (used when ``balanced``).
        seed: integer seed; the draw of query ``q`` is a pure function of ``(seed, q)``.
        balanced: bin first (TAS-Balanced) or a uniform pair ("random" in the paper).

    Returns:
        int64 ``[n]`` pair-table rows, row ``i`` inside ``offsets[queries[i]]:offsets[queries[i]+1]``.
    """
    sorted_rows, qbin_off, bin_start, bin_count, _ = table
    return _draw_pairs(np.ascontiguousarray(queries, dtype=np.int64), np.ascontiguousarray(offsets, dtype=np.int64),
                       qbin_off, bin_start, bin_count, sorted_rows, np.uint64(seed & 0xFFFFFFFFFFFFFFFF),
                       bool(balanced))


@njit
def _draw_own_pairs(queries, offsets, margin, num_bins, seed, balanced):
    n = queries.shape[0]
    out = np.empty(n, dtype=np.int64)
    state = np.empty(1, dtype=np.uint64)
    counts = np.zeros(num_bins, dtype=np.int64)
    for i in range(n):
        q = queries[i]
        state[0] = seed ^ (np.uint64(q) * SPLITMIX_M1)  # the same counter-based draw as _draw_pairs
        r1 = splitmix64(state) >> np.uint64(32)
        r2 = splitmix64(state) >> np.uint64(32)
        a, b = offsets[q], offsets[q + 1]
        if not balanced:
            out[i] = a + np.int64((r1 * np.uint64(b - a)) >> np.uint64(32))
            continue
        lo = np.float64(margin[a])
        hi = lo
        for r in range(a + 1, b):
            v = np.float64(margin[r])
            lo = min(lo, v)
            hi = max(hi, v)
        width = hi - lo
        counts[:] = 0
        if width <= 0.0:
            counts[0] = b - a  # equal margins: every pair in bin 0
        else:
            for r in range(a, b):
                k = min(max(np.int64(np.floor((np.float64(margin[r]) - lo) / width * num_bins)), 0), num_bins - 1)
                counts[k] += 1
        nonempty = 0
        for k in range(num_bins):
            if counts[k] > 0:
                nonempty += 1
        e = np.int64((r1 * np.uint64(nonempty)) >> np.uint64(32))  # the e-th non-empty bin, ascending
        kb = 0
        for k in range(num_bins):
            if counts[k] > 0:
                if e == 0:
                    kb = k
                    break
                e -= 1
        j = np.int64((r2 * np.uint64(counts[kb])) >> np.uint64(32))  # the j-th pair of bin kb, in row order
        if width <= 0.0:
            out[i] = a + j
            continue
        for r in range(a, b):
            k = min(max(np.int64(np.floor((np.float64(margin[r]) - lo) / width * num_bins)), 0), num_bins - 1)
            if k == kb:
                if j == 0:
                    out[i] = r
                    break
                j -= 1
    return out


def draw_own_pairs(queries: NDArray[np.int64], offsets: NDArray[np.int64], margin: NDArray[np.floating],
                   num_bins: int, seed: int, *, balanced: bool = True) -> NDArray[np.int64]:
    """:func:`draw_pairs` without the per-pair tables: each query's margin bins are computed from its own pairs.

    Gives exactly ``draw_pairs(queries, offsets, bin_table(offsets, margin_bins(offsets, margin, num_bins),
    num_bins), seed, balanced=balanced)``, reading only the pairs of ``queries`` (O(their pairs) time, O(num_bins)
    memory), so ``offsets`` and ``margin`` may be memory maps of any size.

    Args:
        queries: int64 ``[n]`` query indices; every one must have at least one pair.
        offsets: int64 ``[Q+1]`` CSR offsets of the pair table.
        margin: float32/float64 ``[P]`` finite margins (compared as float64, as :func:`margin_bins` does).
        num_bins: equal-width margin bins per query, ``>= 1``.
        seed: integer seed; the draw of query ``q`` is a pure function of ``(seed, q, q's pairs)``.
        balanced: bin first (TAS-Balanced) or a uniform pair.

    Returns:
        int64 ``[n]`` pair-table rows, row ``i`` inside ``offsets[queries[i]]:offsets[queries[i]+1]``.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1 (got {num_bins=})")
    return _draw_own_pairs(np.ascontiguousarray(queries, dtype=np.int64), np.asarray(offsets), np.asarray(margin),
                           np.int64(num_bins), np.uint64(seed & 0xFFFFFFFFFFFFFFFF), bool(balanced))
