"""Duration bins for bucketed speech batches: 1D (equal total duration, as Lhotse) and 2D (duration x output
tokens, equal total tokens per sub-bucket after a tokens-per-second outlier filter, as NeMo).

From "Training and Inference Efficiency of Encoder-Decoder Speech Models" (Żelasko et al., 2025).

Conventions (those of the reference code, so bins move between the tools unchanged):

* 1D bins are ``num_buckets - 1`` increasing boundaries; bucket ``i`` holds ``bins[i-1] < d <= bins[i]`` and
  the last bucket is open (Lhotse's ``estimate_duration_buckets`` / ``bisect_left``). Where Lhotse's rule repeats
  an edge (many cuts of one duration) the repeat, an always-empty bucket, is removed; fewer buckets than asked
  are never silent: a :class:`BinsWarning` names the count returned and why (``strict=True``: a ``ValueError``).
* 2D bins are ``[K, 2]`` rows ``(max_duration, max_tokens)`` sorted by duration then tokens; every bucket is
  closed (NeMo's ``bucket_duration_bins``).
"""

from __future__ import annotations

import warnings

import numpy as np
from numpy.typing import ArrayLike, NDArray

from samplers.base import check_lengths

__all__ = ["BinsWarning", "check_durations", "estimate_duration_bins", "estimate_duration_bins_2d"]


class BinsWarning(UserWarning):
    """Bin estimation returned fewer buckets than asked for; the message gives the count and the reason."""


def _shortfall(message: str, strict: bool) -> None:
    """Warn (or, with ``strict``, raise) about bins fewer than asked for."""
    if strict:
        raise ValueError(message + " (strict=True)")
    warnings.warn(message, BinsWarning, stacklevel=3)


def _repeat_reason(edges: NDArray[np.float64], d: NDArray[np.float64]) -> str:
    """Why edges repeat: the most repeated edge value and how many cuts have exactly that duration."""
    vals, counts = np.unique(edges, return_counts=True)
    top = int(np.argmax(counts))
    same = int(np.count_nonzero(d == vals[top]))
    return (f"{int((counts - 1).sum())} edge(s) repeat: {same} of {len(d)} cuts last exactly {vals[top]:g} s, more "
            f"than one bucket's share of the total duration, so the equal-duration rule puts {int(counts[top])} "
            "edges there")


def check_durations(durations: ArrayLike, name: str = "durations") -> NDArray[np.float64]:
    """Validate durations: 1-D, finite, ``> 0``. Returns float64.

    Raises:
        ValueError: naming the first bad row (NaN/inf, negative or zero duration).
    """
    arr = np.asarray(durations)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (got shape {arr.shape})")
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be numbers (got dtype {arr.dtype})")
    arr = arr.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(arr))
    if len(bad):
        raise ValueError(f"{name} has NaN/inf at row {int(bad[0])} ({len(bad)} rows in all); fix the metadata")
    bad = np.flatnonzero(arr <= 0)
    if len(bad):
        raise ValueError(
            f"{name} must be > 0: row {int(bad[0])} has {arr[bad[0]]} ({len(bad)} rows in all); "
            "remove empty or broken cuts before sampling"
        )
    return arr


def _equal_mass_starts(sizes: NDArray[np.float64], parts: int) -> NDArray[np.int64]:
    """Indices into sorted ``sizes`` where a new part starts, Lhotse's rule: a part closes once its total
    exceeds ``sum / parts``, and the element that finds it full starts the next one."""
    per = sizes.sum() / parts
    cs = np.concatenate([[0.0], np.cumsum(sizes)])
    starts = []
    start = 0
    while True:
        # first i with sum(sizes[start:i]) > per; the element at i opens the next part
        i = int(np.searchsorted(cs, cs[start] + per, side="right"))
        if i >= len(sizes):
            break
        starts.append(i)
        start = i
    return np.asarray(starts, dtype=np.int64)


def estimate_duration_bins(durations: ArrayLike, num_buckets: int, *, strict: bool = False) -> NDArray[np.float64]:
    """Bucket boundaries with equal total duration per bucket (Lhotse's ``estimate_duration_buckets``).

    Edges that Lhotse's rule repeats (many cuts of exactly one duration) are kept once: a repeated edge is a
    bucket no cut can fall in, and every cut keeps its bucket's members. Where Lhotse's greedy rule closes fewer
    buckets than asked (each bucket overshoots its share; on few cuts the excess adds up to whole buckets), the
    edges are the equal-mass quantiles of the cumulative duration instead, which give the count asked for.

    Args:
        durations: float ``[N]`` seconds, ``> 0``.
        num_buckets: number of buckets, ``2 <= num_buckets <= N``.
        strict: raise instead of warning when fewer than ``num_buckets`` buckets result.

    Returns:
        float64 ``[num_buckets - 1]`` strictly increasing boundaries; fewer, with a :class:`BinsWarning`, only
        when so many cuts share one duration that equal-duration edges repeat.

    Raises:
        ValueError: bad arguments, or (``strict=True``) fewer buckets than ``num_buckets``.

    Example:
        >>> estimate_duration_bins([1.0, 2.0, 3.0, 4.0], 2).tolist()
        [4.0]
    """
    d = np.sort(check_durations(durations))
    if not isinstance(num_buckets, (int, np.integer)) or num_buckets < 1:
        raise ValueError(f"num_buckets must be an integer >= 1 (got {num_buckets=})")
    if num_buckets > len(d):
        raise ValueError(f"num_buckets must be <= the number of cuts (got {num_buckets=} for {len(d)} cuts)")
    if num_buckets == 1:
        return np.zeros(0, dtype=np.float64)
    edges = d[_equal_mass_starts(d, num_buckets)].astype(np.float64)
    if len(np.unique(edges)) < num_buckets - 1:
        # Lhotse's greedy rule loses whole buckets to the overshoot of each (few cuts per bucket): equal-mass
        # quantiles of the cumulative duration keep the count asked for where the durations allow it
        cs = np.cumsum(d)
        q = np.searchsorted(cs, cs[-1] * np.arange(1, num_buckets) / num_buckets, side="left")
        quantiles = d[np.minimum(q, len(d) - 1)].astype(np.float64)
        bins = np.unique(quantiles if len(np.unique(quantiles)) > len(np.unique(edges)) else edges)
        if len(bins) < num_buckets - 1:  # the quantiles repeat too: too many cuts of one duration
            _shortfall(f"{len(bins) + 1} duration buckets instead of num_buckets={num_buckets}: "
                       f"{_repeat_reason(quantiles, d)}; ask for fewer buckets, or pass bucket_bins", strict)
        return bins
    return edges


def estimate_duration_bins_2d(durations: ArrayLike, output_lengths: ArrayLike, num_buckets: int,
                              num_sub_buckets: int = 2, *, token_outlier_threshold: float = 4.0,
                              return_max_tps: bool = False, strict: bool = False
                              ) -> NDArray[np.float64] | tuple[NDArray[np.float64], NDArray[np.float64]]:
    """2D bins ``(max_duration, max_tokens)``: duration bins of equal total duration, each split by output
    token count into sub-buckets of equal total tokens (NeMo's ``estimate_duration_bins_2d``).

    Before a duration bin is split, cuts whose tokens-per-second z-score exceeds ``token_outlier_threshold``
    are left out of its estimate (they would inflate the top sub-bucket's token bound and its memory use). At
    sampling time such cuts fit no sub-bucket of their duration and are promoted to a larger bucket or dropped,
    and counted (see :class:`samplers.duration.DurationBucketSampler`). Duration bins that coincide (skewed
    data) are merged, and the merged bin gets proportionally more sub-buckets.

    Args:
        durations: float ``[N]`` seconds, ``> 0``.
        output_lengths: int ``[N]`` output token counts, ``>= 0``.
        num_buckets: duration buckets, ``>= 1``.
        num_sub_buckets: token sub-buckets per duration bucket, ``>= 1``.
        token_outlier_threshold: z-score of tokens per second above which a cut is an outlier (``inf``: none).
        return_max_tps: also return each bin's largest non-outlier tokens-per-second.
        strict: raise instead of warning when ``K < num_buckets * num_sub_buckets``.

    Returns:
        float64 ``[K, 2]`` bins sorted by duration then tokens, ``K <= num_buckets * num_sub_buckets``
        (fewer with a :class:`BinsWarning` naming K and why); with ``return_max_tps`` also float64 ``[K]``.

    Raises:
        ValueError: bad arguments, or (``strict=True``) fewer bins than ``num_buckets * num_sub_buckets``.
    """
    d = check_durations(durations)
    tok = check_lengths(output_lengths, "output_lengths", len(d))
    if not isinstance(num_buckets, (int, np.integer)) or not 1 <= num_buckets <= len(d):
        raise ValueError(f"num_buckets must be an integer in [1, {len(d)}] (got {num_buckets=})")
    if not isinstance(num_sub_buckets, (int, np.integer)) or num_sub_buckets < 1:
        raise ValueError(f"num_sub_buckets must be an integer >= 1 (got {num_sub_buckets=})")
    if not token_outlier_threshold > 0:
        raise ValueError(f"token_outlier_threshold must be > 0 (got {token_outlier_threshold=})")
    order = np.lexsort((tok, d))
    d, tok = d[order], tok[order]
    starts = _equal_mass_starts(d, num_buckets) if num_buckets > 1 else np.zeros(0, np.int64)
    edges = np.concatenate([[0], starts, [len(d)]])
    bins: list[tuple[float, float]] = []
    tps_max: list[float] = []
    a = 0
    merged = 0
    nseg = len(edges) - 1
    for j in range(nseg):
        b = int(edges[j + 1])
        merged += 1
        # the duration bin's bound is the largest duration it holds; equal bounds (skewed data) are merged
        dur_bound = float(d[b - 1])
        if j + 1 < nseg and float(d[int(edges[j + 2]) - 1]) == dur_bound:
            continue
        seg_d, seg_t = d[a:b], tok[a:b]
        tps = seg_t / seg_d
        sd = tps.std()
        keep = np.ones(len(tps), bool) if sd == 0 else (tps - tps.mean()) / sd <= token_outlier_threshold
        kt = np.sort(seg_t[keep])
        top_tps = float(tps[keep].max())
        subs = num_sub_buckets * merged
        cuts = _equal_mass_starts(kt.astype(np.float64), subs) if subs > 1 and kt.sum() > 0 else np.zeros(0, int)
        for c in cuts:
            bins.append((dur_bound, float(kt[c - 1])))
        bins.append((dur_bound, float(kt[-1])))
        tps_max.extend([top_tps] * (len(cuts) + 1))
        a = b
        merged = 0
    out = np.asarray(bins, dtype=np.float64).reshape(-1, 2)
    # equal token bounds inside one duration bin make empty buckets: keep one
    _, uniq = np.unique(out, axis=0, return_index=True)
    uniq = np.sort(uniq)
    out = out[uniq]
    tps_arr = np.asarray(tps_max, dtype=np.float64)[uniq]
    want = num_buckets * num_sub_buckets
    if len(out) < want:
        why = []
        durs = len(np.unique(out[:, 0]))
        if durs < num_buckets:
            dur_edges = d[starts - 1]
            why.append(f"{durs} distinct duration bounds instead of {num_buckets} ("
                       + (_repeat_reason(dur_edges, d) if len(np.unique(dur_edges)) < len(dur_edges) else
                          "the equal-duration rule closes a bucket once it holds more than its share, and the "
                          "excess adds up to whole buckets") + ")")
        if len(out) < len(bins):
            why.append(f"{len(bins) - len(out)} token bound(s) repeat inside a duration bucket (many cuts with "
                       "the same token count)")
        if not why:
            why.append("the equal-token rule closes a sub-bucket once it holds more than its share, and the "
                       "excess adds up to whole sub-buckets")
        _shortfall(f"{len(out)} 2D buckets instead of num_buckets={num_buckets} x num_sub_buckets={num_sub_buckets} "
                   f"= {want}: {'; '.join(why)}; ask for fewer buckets, or pass bucket_bins", strict)
    return (out, tps_arr) if return_max_tps else out
