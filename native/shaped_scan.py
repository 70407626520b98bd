"""Counting passes of :class:`samplers.ShapedMixtureBatchSampler` over 1e9 memory-mapped rows, one chunk at a time.

A shaped mixture needs, per domain, the rows and the units (tokens, seconds) of each group (a length or duration
bucket, a ``2^k`` bucket), and, to hand out rows, the group of every row. At 1e9 rows neither a float64 copy of the
metadata nor an argsort fits a rank's budget, so the group of a row is computed here from its value (or read), row
by row, while counting: :func:`scan_groups` for given group ids, :func:`scan_buckets` for a length/duration and
bucket boundaries. Both carry their totals across calls (chunk after chunk), adding the units of a group in row
order, as ``np.bincount(groups, weights=sizes)`` does, so the totals are bitwise those of the in-RAM path. With
``out`` they also write each row's ``group + 1`` (0 for a row left out) in the same pass, the input of the counting
sort ``samplers.topic_windowed.cluster_index``.

Kernels take arrays and scalars and return arrays; the checks and messages live in ``samplers.shaped_scale``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from native._config import njit
from native.buckets import bucket_1d

__all__ = ["BAD_GROUP", "BAD_SIZE", "BIG_GROUP", "scan_buckets", "scan_groups"]

#: codes of the first bad row: a group below -1, a group past the counters, a size not finite or not > 0
BAD_GROUP, BIG_GROUP, BAD_SIZE = 1, 2, 3


@njit
def _scan_groups(groups, sizes, has_sizes, check_sizes, counts, units, out, write):
    top = counts.shape[0] - 1
    for i in range(groups.shape[0]):
        v = np.int64(groups[i])
        if v < -1:
            return i, BAD_GROUP
        if v >= top:
            return i, BIG_GROUP
        if has_sizes and v >= 0:
            x = np.float64(sizes[i])
            if check_sizes and not (np.isfinite(x) and x > 0.0):
                return i, BAD_SIZE
            units[v + 1] += x
        counts[v + 1] += 1
        if write:
            out[i] = v + 1
    return -1, 0


def scan_groups(groups: NDArray, sizes: NDArray | None, counts: NDArray[np.int64], units: NDArray[np.float64],
                *, check_sizes: bool = True, out: NDArray | None = None) -> tuple[int, int]:
    """Count one chunk of group ids: ``counts[g + 1] += 1`` (``counts[0]``: rows of group ``-1``, left out) and
    ``units[g + 1] += sizes[i]`` for kept rows, in row order; optionally ``out[i] = g + 1``.

    Args:
        groups: integer ``[n]`` (a memory-mapped chunk is read in place).
        sizes: numbers ``[n]`` or None (units are then not touched).
        counts: int64 ``[L + 1]`` running counts (groups ``>= L`` are an error), updated in place.
        units: float64 ``[L + 1]`` running units, updated in place.
        check_sizes: a kept row's size must be finite and ``> 0``.
        out: the output chunk ``[n]`` (an integer dtype that holds ``L``), or None.

    Returns:
        ``(row, code)`` of the first bad row of the chunk (``code`` one of :data:`BAD_GROUP`, :data:`BIG_GROUP`,
        :data:`BAD_SIZE`), else ``(-1, 0)``. Counts up to that row are already added.
    """
    g = np.asarray(groups)
    s = np.zeros(1, np.float64) if sizes is None else np.asarray(sizes)
    write = out is not None
    o = np.zeros(1, np.int8) if out is None else out
    row, code = _scan_groups(g, s, sizes is not None, bool(check_sizes), counts, units, o, write)
    return int(row), int(code)


@njit
def _scan_buckets(values, bins, budget, quadratic, floor, counts, units, top, out, write):
    nb = bins.shape[0]
    for i in range(values.shape[0]):
        x = np.float64(values[i])
        if floor and x < 1.0:  # NaN stays NaN, as np.maximum(x, 1.0)
            x = 1.0
        c = x if quadratic == 0.0 else x + x * x / quadratic
        if c > budget:
            counts[0] += 1
            if write:
                out[i] = 0
            continue
        if not (np.isfinite(x) and x > 0.0):
            return i, BAD_SIZE
        lo = bucket_1d(x, bins)  # np.searchsorted(bins, x, side="left"), the duration plans' 1D lookup
        counts[lo + 1] += 1
        units[lo + 1] += x
        if lo == nb and x > top[0]:
            top[0] = x
        if write:
            out[i] = lo + 1
    return -1, 0


def scan_buckets(values: NDArray, bins: NDArray[np.float64], budget: float, quadratic: float, floor: bool,
                 counts: NDArray[np.int64], units: NDArray[np.float64], top: NDArray[np.float64], *,
                 out: NDArray | None = None) -> tuple[int, int]:
    """Count one chunk of lengths or durations by bucket: a row costing more than ``budget`` (cost ``x`` or
    ``x + x^2 / quadratic``) is left out (``counts[0]``); else its bucket ``k = searchsorted(bins, x, "left")``
    gets ``counts[k + 1] += 1`` and ``units[k + 1] += x``, in row order.

    Args:
        values: numbers ``[n]`` (a memory-mapped chunk is read in place); read as float64.
        bins: float64 ``[K - 1]`` increasing boundaries (bucket ``K - 1`` is open).
        budget: the cost above which a row is left out.
        quadratic: ``q`` of the quadratic cost, 0 for a linear one.
        floor: values below 1 count as 1 (a row of no tokens still costs a slot).
        counts, units: int64 / float64 ``[K + 1]`` running totals, updated in place.
        top: float64 ``[1]`` the largest value of the open bucket so far, updated in place.
        out: as :func:`scan_groups` (``k + 1`` written, 0 for a row left out).

    Returns:
        ``(row, BAD_SIZE)`` for the first kept row whose value is not finite or not ``> 0``, else ``(-1, 0)``.
    """
    v = np.asarray(values)
    write = out is not None
    o = np.zeros(1, np.int8) if out is None else out
    row, code = _scan_buckets(v, np.ascontiguousarray(bins, dtype=np.float64), float(budget), float(quadratic),
                              bool(floor), counts, units, top, o, write)
    return int(row), int(code)
