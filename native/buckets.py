"""Which bucket a value falls in: the one lookup behind the 1D and 2D duration buckets (exact and windowed plans)
and the shaped mixtures' counting passes.

1D buckets are cut by increasing bounds: bucket ``k`` holds ``bounds[k-1] < x <= bounds[k]`` (the last is open),
``np.searchsorted(bounds, x, side="left")`` for one value (:func:`bucket_1d`). 2D buckets are NeMo's duration x
output-token bins of "Training and Inference Efficiency of Encoder-Decoder Speech Models" (Żelasko et al., 2025),
sorted by (duration, tokens): a cut goes to the bins of the first duration bound that holds it, among them to the
first whose token bound holds it, else (lenient) to the next larger bin that does (:func:`bucket_2d`, the bins
grouped once by :func:`duration_groups`).

Bare kernels, one value at a time, called from the kernels of :mod:`native.duration`,
:mod:`native.duration_windows` and :mod:`native.shaped_scan`.
"""

from __future__ import annotations

import numpy as np

from native._config import njit

__all__ = ["bucket_1d", "bucket_2d", "duration_groups"]

#: up to this many bounds a branch-free count beats bisection (measured on the shaped-mixture scans)
LINEAR_BOUNDS = 64


@njit
def bucket_1d(x: np.float64, bounds: np.ndarray) -> np.int64:
    """``np.searchsorted(bounds, x, side="left")``: the number of ``bounds`` (increasing) below ``x``, counted
    without branches for up to :data:`LINEAR_BOUNDS` bounds, else by bisection (0 for a NaN ``x``, as numpy's
    ``bounds < x`` count)."""
    nb = bounds.shape[0]
    lo = 0
    if nb <= LINEAR_BOUNDS:
        for j in range(nb):
            lo += bounds[j] < x
        return lo
    # bisection without branches (a select per halving): the answer stays in [lo, lo + m]
    m = nb
    while m > 1:
        half = m // 2
        lo = lo + half if bounds[lo + half] < x else lo
        m -= half
    return lo + (bounds[lo] < x)


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
    token bound holds ``t`` (promoted); ``-1`` when none does (and for a NaN ``t``). The token bounds of one
    duration bound ascend, so the bin among them is a count without branches (random tokens mispredict a scan)."""
    u = bucket_1d(d, bounds)
    if u == bounds.shape[0] or np.isnan(t):
        return -1, False  # longer than every bin, or NaN tokens (no bound holds them)
    a = starts[u]
    e = starts[u + 1]
    j = a
    for i in range(a, e):
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
