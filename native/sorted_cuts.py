"""Sort in chunks, cut under a budget: the one kernel behind the "random yet tight" batches of DESIGN.md.

Token-budget batches (``samplers.token_budget``, exact and windowed) and duration buckets (``native.duration``)
build an epoch the same way: rows in a random order are split into segments (one per bucket; the token budget
has one), each segment is cut into chunks of a few batches, each chunk is sorted by its key (length or duration;
the duration buckets alternate up and down, so a batch spanning two chunks joins their long ends), and batches are
cut greedily, in order, under a *padded* budget. The cut rule is one of two, chosen by a scalar:

* linear (``quad == 0``): a batch of ``n`` rows whose largest key is ``m`` keeps ``n * m <= budget``
  (token budget: ``len(batch) * max(length) <= max_tokens``);
* quadratic (``quad > 0``): ``n * (m + m**2 / quad) <= budget`` (attention's quadratic cost, Żelasko et al.,
  "Training and Inference Efficiency of Encoder-Decoder Speech Models", 2025),

and in both ``n <= caps[segment]``. A single row over the budget forms a batch of its own (callers drop such rows
first). Integer keys are cut in integer arithmetic, float keys in float64, so each caller keeps its plans bit for
bit. The chunk sort is stable (ties keep the shuffled order): an LSD radix sort of the keys' bit patterns (the
order of their values for non-negative integers and non-negative floats), faster than a merge sort on chunks of
~1,000 rows; a chunk with a negative key (or -0.0) or a NaN falls back to ``np.argsort(kind="mergesort")``, the
order the radix sort stands for.

:func:`sort_cut` is the bare kernel (callable from other kernels, e.g. ``native.windows``' counting pass without
the rows); :func:`sorted_cuts` its checking wrapper. :func:`sort_chunk` is also the one sort of the packing plans
(``native.pack_windows``: best-fit decreasing takes each sub-window's cuts longest first). The plans through this
kernel are as fast as, or faster than, the per-plan sorts and cuts it replaced: ``benchmarks/bench_revisions.py``
times both side by side.
"""

from __future__ import annotations

import numba
import numpy as np
from numpy.typing import NDArray

from native._config import njit

__all__ = ["cut_segment", "sort_chunk", "sort_cut", "sorted_cuts"]


#: The bit pattern of float64 +inf: patterns of non-negative, non-NaN floats (and of integers) up to it are ordered
#: as their values.
_INF_BITS = np.uint64(0x7FF0000000000000)


@njit
def _fallback_sort(keys: np.ndarray, rows: np.ndarray, with_rows: bool, descending: bool) -> None:
    order = np.argsort(-keys if descending else keys, kind="mergesort")
    keys[:] = keys[order]
    if with_rows:
        rows[:] = rows[order]


@njit
def sort_chunk(keys: np.ndarray, rows: np.ndarray, with_rows: bool, descending: bool, tk: np.ndarray,
               tr: np.ndarray) -> None:
    """Stable sort of ``keys`` (int64 or float64, in place) ascending or ``descending``, ``rows`` moved alongside
    when ``with_rows``: the order of ``np.argsort(keys or -keys, kind="mergesort")``. ``tk``/``tr``: scratch of
    at least ``len(keys)`` (``tr`` unused without rows). A bare kernel.

    LSD radix with 8-bit digits over the four highest bytes in which the 64-bit patterns differ (all of them for
    lengths below 2**32: two passes below 65,536; float keys: at most the upper four bytes), then a stable
    insertion pass for keys that share those bytes and differ below them (few for durations: the upper four bytes
    hold ~20 bits of the mantissa). Compiled once per ``with_rows`` and ``descending`` (``numba.literally``)."""
    if with_rows:
        if descending:
            _sort_chunk(keys, rows, True, True, tk, tr)
        else:
            _sort_chunk(keys, rows, True, False, tk, tr)
    elif descending:
        _sort_chunk(keys, rows, False, True, tk, tr)
    else:
        _sort_chunk(keys, rows, False, False, tk, tr)


@njit
def _sort_chunk(keys: np.ndarray, rows: np.ndarray, with_rows: bool, descending: bool, tk: np.ndarray,
                tr: np.ndarray) -> None:
    numba.literally(with_rows)
    numba.literally(descending)
    n = keys.shape[0]
    if n < 2:
        return
    bits = keys.view(np.uint64)
    first = bits[0]
    differ = np.uint64(0)
    top = np.uint64(0)
    flip = np.uint64(0xFFFFFFFFFFFFFFFF) if descending else np.uint64(0)
    # float keys radix their upper 32 bits (sign, exponent, 20 bits of mantissa) and leave the rest to the insertion
    # pass: a chunk of one duration bucket spans a narrow range, and float32 durations hold 3 bits in byte 3, so a
    # third radix pass costs more than the few ties it saves. Their histogram is counted in the first pass.
    upper = isinstance(keys[0], float)
    hist = np.zeros((4, 257), dtype=np.int64)
    if upper:
        for i in range(n):
            b = bits[i]
            differ |= b ^ first
            top = b if b > top else top
            k = (b ^ flip) >> np.uint64(32)
            hist[0, (k & np.uint64(255)) + 1] += 1
            hist[1, ((k >> np.uint64(8)) & np.uint64(255)) + 1] += 1
            hist[2, ((k >> np.uint64(16)) & np.uint64(255)) + 1] += 1
            hist[3, ((k >> np.uint64(24)) & np.uint64(255)) + 1] += 1
    else:
        for i in range(n):
            b = bits[i]
            differ |= b ^ first
            top = b if b > top else top
    # a sign bit (negative, -0.0) or a pattern above +inf's (NaN; an integer key above 2**62.99): the patterns may
    # not order the values, the merge sort does
    if top > _INF_BITS:
        _fallback_sort(keys, rows, with_rows, descending)
        return
    if differ == 0:
        return  # all equal: a stable sort keeps the order
    hi = 7
    while (differ >> np.uint64(8 * hi)) & np.uint64(255) == 0:
        hi -= 1
    lo = max(0, hi - 3)
    if upper and hi >= 4:
        lo = 4  # the histogram of bytes 4..7 is counted
    elif hi == lo:  # one byte (lengths below 256)
        hist[:] = 0
        s0 = np.uint64(8 * lo)
        for i in range(n):
            hist[0, (((bits[i] ^ flip) >> s0) & np.uint64(255)) + 1] += 1
    elif hi == lo + 1:  # two bytes (lengths below 65,536): unrolled, the counting pass's common case
        hist[:] = 0
        s0 = np.uint64(8 * lo)
        s1 = np.uint64(8 * hi)
        for i in range(n):
            k = bits[i] ^ flip
            hist[0, ((k >> s0) & np.uint64(255)) + 1] += 1
            hist[1, ((k >> s1) & np.uint64(255)) + 1] += 1
    else:
        hist[:] = 0
        for i in range(n):
            k = bits[i] ^ flip
            for p in range(lo, hi + 1):
                hist[p - lo, ((k >> np.uint64(8 * p)) & np.uint64(255)) + 1] += 1
    sk, sr, dk, dr = keys, rows, tk[:n], tr[: n if with_rows else 0]
    passes = 0
    for p in range(lo, hi + 1):
        if (differ >> np.uint64(8 * p)) & np.uint64(255) == 0:
            continue  # every key shares this digit
        h = hist[p - lo]
        for d in range(256):
            h[d + 1] += h[d]
        sb = sk.view(np.uint64)
        shift = np.uint64(8 * p)
        if with_rows:
            for i in range(n):
                dg = ((sb[i] ^ flip) >> shift) & np.uint64(255)
                at = h[dg]
                dk[at] = sk[i]
                dr[at] = sr[i]
                h[dg] = at + 1
        else:
            for i in range(n):
                dg = ((sb[i] ^ flip) >> shift) & np.uint64(255)
                at = h[dg]
                dk[at] = sk[i]
                h[dg] = at + 1
        sk, sr, dk, dr = dk, dr, sk, sr
        passes += 1
    if passes % 2 == 1:  # the sorted keys are in the scratch
        keys[:] = sk
        if with_rows:
            rows[:] = sr
    if lo == 0 or differ & ((np.uint64(1) << np.uint64(8 * lo)) - np.uint64(1)) == 0:
        return  # the radix passes saw every byte that differs
    if with_rows:  # keys sharing the sorted bytes, in their stable order (insertion)
        for i in range(1, n):
            v = keys[i]
            r = rows[i]
            j = i - 1
            while j >= 0 and ((keys[j] < v) if descending else (keys[j] > v)):
                keys[j + 1] = keys[j]
                rows[j + 1] = rows[j]
                j -= 1
            keys[j + 1] = v
            rows[j + 1] = r
    else:
        for i in range(1, n):
            v = keys[i]
            j = i - 1
            while j >= 0 and ((keys[j] < v) if descending else (keys[j] > v)):
                keys[j + 1] = keys[j]
                j -= 1
            keys[j + 1] = v


@njit
def _cut(keys: np.ndarray, s: np.int64, e: np.int64, cap: np.int64, budget, quad: np.float64, offsets: np.ndarray,
         nb: np.int64, quadratic: bool) -> np.int64:
    numba.literally(quadratic)  # compiled once per rule, the other rule's test pruned out of the loop
    seg = keys[s:e]
    cuts = offsets[nb:]
    n = seg.shape[0]
    k = 0
    cur_n = 0
    cur_max = seg[0]
    if cur_max < 0:  # the running maximum starts at zero (of the keys' type)
        cur_max = cur_max - cur_max
    for i in range(n):
        d = seg[i]
        m = d if d > cur_max else cur_max
        if quadratic:
            over = (cur_n + 1) * (m + m * m / quad) > budget
        else:
            over = (cur_n + 1) * m > budget
        if cur_n > 0 and (over or cur_n + 1 > cap):
            k += 1
            cuts[k] = s + i
            cur_max = d
            cur_n = 1
        else:
            cur_max = m
            cur_n += 1
    if cur_n > 0:
        k += 1
        cuts[k] = e
    return nb + k


@njit
def cut_segment(keys: np.ndarray, s: np.int64, e: np.int64, cap: np.int64, budget, quad: np.float64,
                offsets: np.ndarray, nb: np.int64) -> np.int64:
    """Cut ``keys[s:e]`` (``e > s``) greedily, in order, under the module's rule; appends the end of each batch to
    ``offsets[nb + 1:]`` and returns the new batch count. A bare kernel.

    The loop is written for the compiler: one specialisation per rule (``numba.literally``), over views of the
    segment and of the offsets still to write, the last batch closed under ``if cur_n > 0`` although it always
    holds. Each other form measured (the rule tested inside the loop at run time, both rules' loops in one
    function, ``range(s, e)``, an unguarded last batch) made the linear cut 1.2-2x slower in LLVM's code for the
    same arithmetic."""
    if quad > 0:
        return _cut(keys, s, e, cap, budget, quad, offsets, nb, True)
    return _cut(keys, s, e, cap, budget, quad, offsets, nb, False)


@njit
def sort_cut(keys: np.ndarray, rows: np.ndarray, with_rows: bool, seg_offsets: np.ndarray, chunk_rows: np.ndarray,
             alternate: bool, caps: np.ndarray, budget, quad: np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Sort each segment's chunks and cut its batches (see the module docstring). A bare kernel.

    ``keys`` (int64 or float64 ``[N]``) and, ``with_rows``, ``rows`` (int64 ``[N]``; any array without) are
    sorted in place: segment ``g`` is ``[seg_offsets[g], seg_offsets[g+1])``, its chunks of ``chunk_rows[g]``
    rows (``<= 1``: not sorted) ascending, or with ``alternate`` ascending, descending, ascending, ... (counted
    from each segment's start). ``budget``: an int64 budget cuts integer keys in integer arithmetic; ``quad`` as
    in :func:`cut_segment`. Returns ``(offsets, groups)``: int64 ``[B + 1]`` batch offsets into ``keys`` and int64
    ``[B]`` segment of each batch."""
    n = keys.shape[0]
    nseg = seg_offsets.shape[0] - 1
    offsets = np.empty(n + 1, dtype=np.int64)
    offsets[0] = 0
    width = 0
    for g in range(nseg):
        width = max(width, min(chunk_rows[g], seg_offsets[g + 1] - seg_offsets[g]))
    tk = np.empty(width, dtype=keys.dtype)
    tr = np.empty(width if with_rows else 0, dtype=np.int64)
    nb = 0
    for g in range(nseg):
        s = seg_offsets[g]
        e = seg_offsets[g + 1]
        if e == s:
            continue
        w = chunk_rows[g]
        if w > 1:
            c = 0
            for cs in range(s, e, w):
                ce = min(cs + w, e)
                sort_chunk(keys[cs:ce], rows[cs:ce] if with_rows else rows[:0], with_rows,
                           alternate and c % 2 == 1, tk, tr)
                c += 1
        nb = cut_segment(keys, s, e, caps[g], budget, quad, offsets, nb)
    offsets = offsets[: nb + 1].copy()
    # a batch's segment: the last whose start is at or before the batch's (empty segments hold no batch)
    groups = np.searchsorted(seg_offsets, offsets[:-1], side="right") - 1
    return offsets, groups.astype(np.int64)


def sorted_cuts(keys: NDArray, rows: NDArray[np.int64], *, budget: float,
                seg_offsets: NDArray[np.int64] | None = None, chunk_rows: int | NDArray[np.int64] = 1,
                caps: int | NDArray[np.int64] | None = None, alternate: bool = False,
                quadratic: float | None = None
                ) -> tuple[NDArray, NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Sort chunks of rows by key, then cut batches in order under a padded budget (module docstring).

    Args:
        keys: ``[N]`` key of each position (lengths: integers ``>= 0``, cut in int64 arithmetic; durations:
            floats, cut in float64).
        rows: int64 ``[N]`` row ids moved with their keys (the bare :func:`sort_cut` also sorts keys alone).
        budget: padded budget per batch (``max_tokens`` or ``max_duration``; ``inf`` for none with float keys).
        seg_offsets: int64 ``[K+1]`` segment (bucket) boundaries from 0 to ``N``; default one segment.
        chunk_rows: rows sorted together, one for all segments or int64 ``[K]`` (``<= 1``: no sorting).
        caps: most rows per batch, one or int64 ``[K]``; default no cap.
        alternate: sort every second chunk of a segment descending.
        quadratic: ``q`` of the quadratic cost ``m + m**2 / q``, or ``None`` for the linear one.

    Returns:
        ``(keys, rows, offsets, groups)``: sorted copies of ``keys`` (int64 or float64) and ``rows`` (int64),
        int64 ``[B+1]`` batch offsets and int64 ``[B]`` segment of each batch.

    Raises:
        ValueError: for a budget or quadratic term that is not ``> 0``, caps below 1, or offsets or per-segment
            arrays of the wrong shape.
    """
    k = np.array(keys, dtype=np.int64 if np.asarray(keys).dtype.kind in "iub" else np.float64)
    if k.ndim != 1:
        raise ValueError(f"keys must be 1-D (got shape {k.shape})")
    n = len(k)
    r = np.array(rows, dtype=np.int64)
    if r.shape != (n,):
        raise ValueError(f"rows must have the shape of keys, ({n},) (got {r.shape}); pass one row id per key")
    if not budget > 0:
        raise ValueError(f"budget must be > 0 (got {budget=})")
    if quadratic is not None and not quadratic > 0:
        raise ValueError(f"quadratic must be > 0 or None (got {quadratic=}); pass None for the linear cost")
    seg = (np.array([0, n], dtype=np.int64) if seg_offsets is None
           else np.ascontiguousarray(seg_offsets, dtype=np.int64))
    if seg.ndim != 1 or len(seg) < 2 or seg[0] != 0 or seg[-1] != n or np.any(np.diff(seg) < 0):
        raise ValueError(f"seg_offsets must be non-decreasing from 0 to len(keys)={n} (got {seg.tolist()})")
    nseg = len(seg) - 1
    big = np.iinfo(np.int64).max
    per_segment = []
    for name, value in (("chunk_rows", chunk_rows), ("caps", big if caps is None else caps)):
        arr = np.asarray(value, dtype=np.int64)
        if arr.ndim > 1 or (arr.ndim == 1 and arr.shape != (nseg,)):
            raise ValueError(f"{name} must be one integer or one per segment, {nseg} (got shape {arr.shape})")
        per_segment.append(np.broadcast_to(arr, (nseg,)).copy())
    chunk, cap = per_segment
    if np.any(cap < 1):
        raise ValueError(f"caps must be >= 1 (got {cap.tolist()}); pass None for no cap")
    if k.dtype == np.int64:
        if budget != np.inf and float(budget) != int(budget):
            raise ValueError(f"budget must be an integer with integer keys (got {budget=})")
        b = np.int64(min(int(budget), big)) if budget != np.inf else np.int64(big)
    else:
        b = np.float64(budget)
    q = np.float64(0.0 if quadratic is None else quadratic)
    offsets, groups = sort_cut(k, r, True, seg, chunk, bool(alternate), cap, b, q)
    return k, r, offsets, groups
