"""Members of a bucket without a per-row table: per-chunk counts, and the ``j``-th row of bucket ``k`` by a scan.

A decomposed index lists its sequences in document order, so the sequences of one bucket ``k`` (all with
``sequence_log2 == k``) are scattered. An 8 B/row table of each bucket's rows costs 8 GB at 1e9 sequences;
instead :func:`chunk_counts` counts the rows of every value per chunk of ``chunk`` consecutive rows (one pass,
``[chunks, 64]`` int32: 16 MB at 1e9 rows and ``chunk = 2**14``), and :func:`select_rows` finds the ``j``-th row
of value ``k`` (in row order) from the prefix sums of its column and a scan of one chunk. This is the classic
rank/select structure of succinct data structures (Jacobson, "Space-efficient static trees and graphs", FOCS 1989)
with a plain scan in place of the sub-chunk directory.
"""

from __future__ import annotations

import numba
import numpy as np
from numpy.typing import NDArray

from native._config import njit

__all__ = ["VALUES", "chunk_counts", "select_rows"]

#: values counted per chunk: ``0 <= value < VALUES``
VALUES = 64


@njit(parallel=True)
def _chunk_counts(values, chunk, first, count):
    nc = count.shape[0]
    n = values.shape[0]
    for c in numba.prange(nc):
        bad = np.int64(-1)
        for i in range(c * chunk, min(n, (c + 1) * chunk)):
            v = np.int64(values[i])
            if 0 <= v < VALUES:
                count[c, v] += 1
            elif bad < 0:
                bad = i
        first[c] = bad


def chunk_counts(values, chunk: int) -> tuple[NDArray[np.int32], int]:
    """Rows of every value per chunk of ``chunk`` consecutive rows, in one pass (reads a memory map in place).

    Args:
        values: integer ``[N]`` (any int dtype, e.g. a memory-mapped int8 ``sequence_log2``), values in
            ``[0, VALUES)``.
        chunk: rows per chunk, ``1 <= chunk < 2**31``.

    Returns:
        ``(counts, first_bad)``: int32 ``[ceil(N / chunk), VALUES]`` and the first row whose value lies outside
        ``[0, VALUES)`` (``-1`` when none; such rows are not counted).
    """
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise TypeError(f"values must be a 1-D integer array (got {arr.dtype}, shape {arr.shape})")
    if not isinstance(chunk, (int, np.integer)) or not 1 <= chunk < 2**31:
        raise ValueError(f"chunk must be an integer in [1, 2**31) (got {chunk=})")
    nc = -(-len(arr) // chunk)
    count = np.zeros((nc, VALUES), dtype=np.int32)
    first = np.empty(nc, dtype=np.int64)
    if nc:
        with numba.parallel_chunksize(1):
            _chunk_counts(arr, np.int64(chunk), first, count)
    bad = first[first >= 0]
    return count, int(bad[0]) if len(bad) else -1


@njit
def _select_rows(values, chunk, cum, k, ranks):
    # ranks visited in ascending order: ranks in one chunk share one forward scan
    out = np.empty(ranks.shape[0], dtype=np.int64)
    order = np.argsort(ranks, kind="mergesort")
    n = values.shape[0]
    last_m = np.int64(-1)
    last_c = np.int64(-1)
    pos = np.int64(0)
    seen = np.int64(0)
    for t in range(order.shape[0]):
        i = order[t]
        m = ranks[i]
        if m == last_m:
            out[i] = pos - 1
            continue
        c = np.searchsorted(cum, m, side="right") - 1
        if c != last_c:
            last_c = c
            pos = c * chunk
            seen = cum[c]
        while True:  # skip whole blocks of 64 rows by counting (a vectorised loop), ...
            e = min(pos + 64, n)
            cnt = np.int64(0)
            for j in range(pos, e):
                cnt += np.int64(values[j] == k)
            if seen + cnt > m or e >= n:
                break
            seen += cnt
            pos = e
        while pos < n:  # ... then scan the block that holds the occurrence
            hit = np.int64(values[pos]) == k
            pos += 1
            if hit:
                seen += 1
                if seen - 1 == m:
                    break
        out[i] = pos - 1
        last_m = m
    return out


def select_rows(values, chunk: int, cum: NDArray[np.int64], k: int, ranks) -> NDArray[np.int64]:
    """The rows holding the ``ranks``-th occurrences (from 0, in row order) of value ``k``.

    Args:
        values: the array :func:`chunk_counts` counted (not copied).
        chunk: its ``chunk``.
        cum: int64 ``[chunks + 1]``: occurrences of ``k`` before each chunk (``0``, then the cumulative sum of
            ``counts[:, k]``).
        k: the value.
        ranks: int ``[m]`` occurrence ranks, each in ``[0, cum[-1])``; repeats allowed, any order.

    Returns:
        int64 ``[m]`` rows, ``values[rows] == k``, in the order of ``ranks``.
    """
    r = np.ascontiguousarray(ranks, dtype=np.int64)
    cum = np.ascontiguousarray(cum, dtype=np.int64)
    if len(r) and (r.min() < 0 or r.max() >= cum[-1]):
        raise ValueError(f"ranks must lie in [0, {int(cum[-1])}) for value {k} (got {int(r.min())}..{int(r.max())})")
    return _select_rows(values, np.int64(chunk), cum, np.int64(k), r)
