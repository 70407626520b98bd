"""native.duration_windows: one unpermuted window is the shared sort-and-cut kernel (native.sorted_cuts) applied to
the window's rows grouped by bucket (native.buckets), for 1D and 2D buckets; its statistics are those batches'."""

from __future__ import annotations

import numpy as np
import pytest

from native.duration import assign_buckets_2d
from native.duration_windows import (
    WINDOW_STATS,
    duration_window_batches,
    duration_window_sizes,
)
from native.sorted_cuts import sorted_cuts


@pytest.mark.parametrize("two_d, quad, strict, chunk, dtype", [
    (False, None, False, 7, np.float32), (False, 20.0, False, 1, np.float64), (True, None, False, 5, np.float32),
    (True, 15.0, True, 11, np.float64)])
def test_unpermuted_window_is_sort_cut_of_its_buckets(two_d, quad, strict, chunk, dtype):
    rng = np.random.default_rng(3)
    n = 2_000
    d = np.clip(rng.lognormal(1.8, 0.7, n), 0.3, 45).astype(dtype)
    d[::97] = 44.0  # over the budget's single-row cost with the quadratic term
    tok = ((d.astype(np.float64) * 7).astype(np.int32) + rng.integers(0, 30, n)).astype(np.int32)
    if two_d:
        bins = np.array([(b, t) for b in (4.0, 9.0, 20.0, 40.0) for t in (30, 90, 250)], np.float64)
        k = len(bins)
    else:
        bins = np.array([3.0, 6.0, 12.0, 25.0])
        k = len(bins) + 1
    chunk_rows, caps = np.full(k, chunk), np.arange(k) % 4 + 6
    kw = dict(block=8, per_window=1 << 20, permute=False, block_seed=1, prefix=2, bins=bins, max_duration=120.0,
              quadratic_duration=quad, chunk_rows=chunk_rows, caps=caps, output_lengths=tok if two_d else None,
              strict_2d=strict)
    rows, off, groups = duration_window_batches(d, 0, **kw)
    sizes, sgroups, stats = duration_window_sizes(d, 0, 1, **kw)

    d64 = d.astype(np.float64)
    cost = d64 + d64 ** 2 / quad if quad else d64
    fits = np.flatnonzero(cost <= 120.0)
    bucket = (assign_buckets_2d(d64[fits], tok[fits], bins, strict)[0] if two_d
              else np.searchsorted(bins, d64[fits], side="left"))
    keep = bucket >= 0
    order = np.argsort(bucket[keep], kind="stable")
    want_rows_in = fits[keep][order]
    seg = np.concatenate([[0], np.cumsum(np.bincount(bucket[keep], minlength=k))])
    keys, want_rows, want_off, want_groups = sorted_cuts(d64[want_rows_in], want_rows_in, budget=120.0,
                                                         seg_offsets=seg, chunk_rows=chunk_rows, caps=caps,
                                                         alternate=True, quadratic=quad)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(off, want_off)
    np.testing.assert_array_equal(groups, want_groups)
    np.testing.assert_array_equal(sizes[0], np.diff(want_off))
    np.testing.assert_array_equal(sgroups[0], want_groups)

    st = dict(zip(WINDOW_STATS, stats[0]))
    per_batch = [keys[a:b] for a, b in zip(want_off[:-1], want_off[1:])]
    assert st["dropped_long"] == n - len(fits)
    assert st["seconds"] == pytest.approx(keys.sum())
    assert st["padded_seconds"] == pytest.approx(sum(len(x) * x.max() for x in per_batch))
    assert st["top"] == keys.max()
    assert st["outside_2d_bins"] == (~keep).sum()
    if two_d:
        t = tok[want_rows].astype(np.float64)
        assert st["tokens"] == t.sum()
        assert st["padded_tokens"] == sum((b - a) * t[a:b].max() for a, b in zip(want_off[:-1], want_off[1:]))
        assert (not strict) or st["promoted_2d"] == 0
    else:
        assert st["tokens"] == st["padded_tokens"] == 0
