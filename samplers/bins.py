"""Duration bins for bucketed speech batches: 1D (equal total duration, as Lhotse) and 2D (duration x output
tokens, equal total tokens per sub-bucket after a tokens-per-second outlier filter, as NeMo).

From "Training and Inference Efficiency of Encoder-Decoder Speech Models" (Żelasko et al., 2025).

Conventions (those of the reference code, so bins move between the tools unchanged):

* 1D bins are ``num_buckets - 1`` increasing boundaries; bucket ``i`` holds ``bins[i-1] < d <= bins[i]`` and
  the last bucket is open (Lhotse's ``estimate_duration_buckets`` / ``bisect_left``).
* 2D bins are ``[K, 2]`` rows ``(max_duration, max_tokens)`` sorted by duration then tokens; every bucket is
  closed (NeMo's ``bucket_duration_bins``).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from samplers.base import check_lengths

__all__ = ["check_durations", "estimate_duration_bins", "estimate_duration_bins_2d"]


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


def estimate_duration_bins(durations: ArrayLike, num_buckets: int) -> NDArray[np.float64]:
    """Bucket boundaries with equal total duration per bucket (Lhotse's ``estimate_duration_buckets``).

    Args:
        durations: float ``[N]`` seconds, ``> 0``.
        num_buckets: number of buckets, ``2 <= num_buckets <= N``.

    Returns:
        float64 ``[num_buckets - 1]`` non-decreasing boundaries (fewer when the data cannot fill them all).

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
    return d[_equal_mass_starts(d, num_buckets)].astype(np.float64)


def estimate_duration_bins_2d(durations: ArrayLike, output_lengths: ArrayLike, num_buckets: int,
                              num_sub_buckets: int = 2, *, token_outlier_threshold: float = 4.0,
                              return_max_tps: bool = False
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

    Returns:
        float64 ``[K, 2]`` bins sorted by duration then tokens, ``K <= num_buckets * num_sub_buckets``;
        with ``return_max_tps`` also float64 ``[K]``.
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
    return (out, tps_arr) if return_max_tps else out
