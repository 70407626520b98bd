"""TAS-Balanced kernels (native.tas) against plain NumPy references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from native.tas import bin_table, draw_pairs, margin_bins

from native.rng import SPLITMIX_GAMMA, SPLITMIX_M1, SPLITMIX_M2

# SplitMix64's constants, from their one home (the reference code below is written independently of the kernels)
GAMMA, M1, M2 = int(SPLITMIX_GAMMA), int(SPLITMIX_M1), int(SPLITMIX_M2)


def ref_margin_bins(offsets, margin, nbins):
    out = np.zeros(len(margin), dtype=np.int64)
    for q in range(len(offsets) - 1):
        m = margin[offsets[q] : offsets[q + 1]]
        if len(m) == 0 or m.max() == m.min():
            continue
        b = np.floor((m - m.min()) / (m.max() - m.min()) * nbins).astype(np.int64)
        out[offsets[q] : offsets[q + 1]] = np.clip(b, 0, nbins - 1)
    return out


def ref_bin_table(offsets, bins, nbins):
    """Per query: the non-empty bins in ascending order, with their pair rows in table order."""
    out = []
    for q in range(len(offsets) - 1):
        rows = np.arange(offsets[q], offsets[q + 1])
        out.append({int(k): rows[bins[rows] == k].tolist() for k in range(nbins) if np.any(bins[rows] == k)})
    return out


def random_table(rng, nq, max_pairs, equal_frac=0.2):
    counts = rng.integers(0, max_pairs + 1, nq)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    margin = rng.normal(size=offsets[-1]) * 3
    for q in np.flatnonzero(rng.random(nq) < equal_frac):  # some queries with all-equal margins
        margin[offsets[q] : offsets[q + 1]] = 1.5
    return offsets, margin


@settings(max_examples=50, deadline=None)
@given(nq=st.integers(1, 30), max_pairs=st.integers(0, 25), nbins=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_margin_bins_and_bin_table_agree_with_reference(nq, max_pairs, nbins, seed):
    rng = np.random.default_rng(seed)
    offsets, margin = random_table(rng, nq, max_pairs)
    bins = margin_bins(offsets, margin, nbins)
    np.testing.assert_array_equal(bins, ref_margin_bins(offsets, margin, nbins))
    sorted_rows, qbin_off, bin_start, bin_count, bin_id = bin_table(offsets, bins, nbins)
    ref = ref_bin_table(offsets, bins, nbins)
    assert sorted(sorted_rows.tolist()) == list(range(offsets[-1]))
    for q in range(nq):
        got = {int(bin_id[e]): sorted_rows[bin_start[e] : bin_start[e] + bin_count[e]].tolist()
               for e in range(qbin_off[q], qbin_off[q + 1])}
        assert got == ref[q]


def test_margin_bins_edges():
    offsets = np.array([0, 4, 7, 8])
    margin = np.array([0.0, 10.0, 5.0, 9.99, 2.0, 2.0, 2.0, -1.0])
    bins = margin_bins(offsets, margin, 10)
    # min -> bin 0, max -> last bin, equal margins and single pairs -> bin 0
    assert bins.tolist() == [0, 9, 5, 9, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="num_bins must be >= 1"):
        margin_bins(offsets, margin, 0)


def ref_draw(queries, offsets, table, seed, balanced):
    """The same counter-based draw, written with Python integers."""
    mask = (1 << 64) - 1

    def splitmix(s):
        s = (s + GAMMA) & mask
        z = s
        z = ((z ^ (z >> 30)) * M1) & mask
        z = ((z ^ (z >> 27)) * M2) & mask
        return s, z ^ (z >> 31)

    sorted_rows, qbin_off, bin_start, bin_count, _ = table
    out = []
    for q in queries.tolist():
        s = seed ^ ((q * M1) & mask)
        s, r1 = splitmix(s)
        s, r2 = splitmix(s)
        r1, r2 = r1 >> 32, r2 >> 32
        if balanced:
            nb = int(qbin_off[q + 1] - qbin_off[q])
            e = int(qbin_off[q]) + ((r1 * nb) >> 32)
            out.append(int(sorted_rows[bin_start[e] + ((r2 * int(bin_count[e])) >> 32)]))
        else:
            out.append(int(offsets[q]) + ((r1 * int(offsets[q + 1] - offsets[q])) >> 32))
    return np.array(out, dtype=np.int64)


@settings(max_examples=40, deadline=None)
@given(nq=st.integers(1, 25), seed=st.integers(0, 2**64 - 1), balanced=st.booleans(), data_seed=st.integers(0, 99))
def test_draw_pairs_agrees_with_reference(nq, seed, balanced, data_seed):
    rng = np.random.default_rng(data_seed)
    offsets, margin = random_table(rng, nq, 20)
    table = bin_table(offsets, margin_bins(offsets, margin, 10), 10)
    queries = np.flatnonzero(np.diff(offsets) > 0)
    queries = rng.permutation(np.concatenate([queries, queries]))  # order and repeats do not matter
    got = draw_pairs(queries, offsets, table, seed, balanced=balanced)
    np.testing.assert_array_equal(got, ref_draw(queries, offsets, table, seed, balanced))
    assert np.all((got >= offsets[queries]) & (got < offsets[queries + 1]))
    # a query's draw depends on (seed, q) only
    first = {}
    for q, r in zip(queries.tolist(), got.tolist()):
        assert first.setdefault(q, r) == r
