"""native.feistel: stateless seeded permutations (Feistel network + cycle walking) and permuted streams."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from native.feistel import (
    ROUNDS,
    feistel_index,
    feistel_permute,
    mix_prefix,
    mix_step,
    stream_batches,
)
from native.rng import mix_seed

from native.rng import SPLITMIX_GAMMA, SPLITMIX_M1, SPLITMIX_M2

# SplitMix64's constants, from their one home (the reference code below is written independently of the kernels)
GAMMA, M1, M2 = int(SPLITMIX_GAMMA), int(SPLITMIX_M1), int(SPLITMIX_M2)

M64 = 0xFFFFFFFFFFFFFFFF
GOLDEN = GAMMA


def _fmix(z):
    """SplitMix64 finaliser on uint64 numpy arrays or Python ints."""
    if isinstance(z, int):
        z = ((z ^ (z >> 30)) * M1) & M64
        z = ((z ^ (z >> 27)) * M2) & M64
        return z ^ (z >> 31)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(M1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(M2)
    return z ^ (z >> np.uint64(31))


def feistel_reference(indices, n, seed):
    """Plain NumPy Feistel permutation: balanced network on 2h bits (4**h >= n), cycle walking into [0, n)."""
    idx = np.asarray(indices, dtype=np.int64)
    if n == 1:
        return np.zeros(len(idx), np.int64)
    h = 1
    while 4**h < n:
        h += 1
    keys, s = [], seed & M64
    for _ in range(ROUNDS):
        s = (s + GOLDEN) & M64
        keys.append(np.uint64(_fmix(s)))
    mask, uh = np.uint64((1 << h) - 1), np.uint64(h)
    x = idx.astype(np.uint64)
    todo = np.ones(len(x), bool)
    while todo.any():
        left, right = x[todo] >> uh, x[todo] & mask
        for k in keys:
            left, right = right, left ^ (_fmix(right ^ k) & mask)
        x[todo] = (left << uh) | right
        todo = x >= np.uint64(n)
    return x.astype(np.int64)


def shuffle_reference(a, seed):
    """The in-batch Fisher-Yates shuffle of native.feistel in plain Python (SplitMix64, multiply-shift)."""
    a, s = list(a), seed & M64
    for i in range(len(a) - 1, 0, -1):
        s = (s + GOLDEN) & M64
        j = ((_fmix(s) >> 32) * (i + 1)) >> 32
        a[i], a[j] = a[j], a[i]
    return np.array(a, dtype=np.int64)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 16, 17, 100, 1023, 1024, 1025, 65_537])
def test_is_a_permutation_and_matches_reference(n):
    for seed in (0, 1, 2**63 + 5):
        p = feistel_permute(np.arange(n), n, seed)
        assert p.dtype == np.int64
        np.testing.assert_array_equal(np.sort(p), np.arange(n))
        np.testing.assert_array_equal(p, feistel_reference(np.arange(n), n, seed))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 3000), st.integers(0, 2**64 - 1))
def test_property_bijective_deterministic_and_agrees_with_numpy(n, seed):
    p = feistel_permute(np.arange(n), n, seed)
    assert len(np.unique(p)) == n and p.min() == 0 and p.max() == n - 1
    np.testing.assert_array_equal(p, feistel_permute(np.arange(n), n, seed))  # deterministic
    np.testing.assert_array_equal(p, feistel_reference(np.arange(n), n, seed))
    sub = np.arange(n)[::3][::-1].copy()  # any subset of positions, in any order, gives the same images
    np.testing.assert_array_equal(feistel_permute(sub, n, seed), p[sub])
    assert feistel_index(np.int64(sub[0]), np.int64(n), np.uint64(seed)) == p[sub[0]]


@settings(max_examples=30, deadline=None)
@given(st.integers(8, 5000), st.integers(0, 2**62))
def test_property_different_seeds_differ(n, seed):
    a = feistel_permute(np.arange(n), n, seed)
    b = feistel_permute(np.arange(n), n, seed + 1)
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, np.arange(n))  # not the identity


def test_huge_domains_without_materialising():
    n = 10**12 + 39  # not a power of two, far larger than memory would allow as a permutation
    pos = np.array([0, 1, 2, n // 2, n - 1], dtype=np.int64)
    got = feistel_permute(pos, n, 3)
    assert np.all((got >= 0) & (got < n)) and len(set(got.tolist())) == 5
    np.testing.assert_array_equal(got, feistel_reference(pos, n, 3))


@pytest.mark.parametrize("n", [2, 5, 10, 37])
def test_position_of_element_zero_is_uniform_over_seeds(n):
    """Chi-square: where element 0 lands over 4,000 seeds (and the image of position 0) is uniform on [0, n)."""
    seeds = range(4000)
    where0 = np.array([int(np.flatnonzero(feistel_permute(np.arange(n), n, s) == 0)[0]) for s in seeds])
    image0 = np.array([int(feistel_permute(np.zeros(1, np.int64), n, s)[0]) for s in seeds])
    for obs in (where0, image0):
        assert sps.chisquare(np.bincount(obs, minlength=n)).pvalue > 1e-4


def test_pairs_are_not_correlated():
    """Consecutive positions land independently: the image of position 1 minus that of position 0 is uniform."""
    n, seeds = 11, range(3000)
    diff = np.array([int(np.diff(feistel_permute(np.arange(2), n, s))[0]) % n for s in seeds])
    counts = np.bincount(diff, minlength=n)
    assert counts[0] == 0  # a bijection never maps two positions to the same row
    assert sps.chisquare(counts[1:]).pvalue > 1e-4


@pytest.mark.parametrize("kw, match", [
    ({"n": 0}, "n must be an integer in \\[1, 2\\*\\*62\\]"),
    ({"n": 2**63}, "n must be"),
    ({"indices": np.array([0, 5])}, "indices must lie in \\[0, n\\) = \\[0, 5\\)"),
    ({"indices": np.array([-1])}, "indices must lie"),
    ({"indices": np.zeros((2, 2), np.int64)}, "1-D"),
])
def test_bad_input(kw, match):
    args = {"indices": np.arange(3), "n": 5, "seed": 0, **kw}
    with pytest.raises(ValueError, match=match):
        feistel_permute(**args)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**64 - 1), min_size=0, max_size=4), st.integers(0, 2**64 - 1))
def test_mix_step_continues_mix_seed(parts, last):
    assert int(mix_step(np.uint64(mix_prefix(*parts)), np.uint64(last))) & (2**63 - 1) == mix_seed(*parts, last)


def stream_batches_reference(starts, counts, sizes, offsets, parts, batch_ids, shuffle_parts):
    """Plain NumPy: materialise each domain's stream (passes of reference permutations) and cut batches."""
    out = []
    for b in range(len(counts)):
        rows = []
        for d in range(len(sizes)):
            k = np.arange(starts[b][d], starts[b][d] + counts[b][d])
            p, i = k // sizes[d], k % sizes[d]
            for q in np.unique(p):
                rows.append(feistel_reference(i[p == q], sizes[d], mix_seed(*parts[d], int(q))) + offsets[d])
        flat = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        out.append(shuffle_reference(flat, mix_seed(*shuffle_parts, int(batch_ids[b]))))
    return np.concatenate(out)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=4), st.integers(1, 6), st.integers(0, 2**31), st.data())
def test_property_stream_batches_agree_with_numpy(sizes, nb, seed, data):
    D = len(sizes)
    counts = np.array(data.draw(st.lists(st.lists(st.integers(0, 70), min_size=D, max_size=D), min_size=nb,
                                         max_size=nb)), dtype=np.uint16)
    starts = np.array(data.draw(st.lists(st.lists(st.integers(0, 200), min_size=D, max_size=D), min_size=nb,
                                         max_size=nb)), dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    parts = [(seed, 1, d) for d in range(D)]
    ids = np.arange(nb, dtype=np.int64) * 3 + 1
    got = stream_batches(starts, counts, np.array(sizes), offsets,
                         np.array([mix_prefix(*p) for p in parts], np.uint64), ids, mix_prefix(seed, 9))
    want = stream_batches_reference(starts, counts.astype(np.int64), sizes, offsets, parts, ids, (seed, 9))
    np.testing.assert_array_equal(got, want)


def test_stream_passes_are_fresh_permutations():
    size, passes = 13, 4
    got = stream_batches(np.zeros((1, 1), np.int64), np.array([[size * passes]]), np.array([size]),
                         np.array([100]), np.array([mix_prefix(5)], np.uint64), np.zeros(1, np.int64), 0)
    # one batch spanning 4 passes: every row exactly 4 times, rows in [100, 113)
    assert np.bincount(got - 100, minlength=size).tolist() == [passes] * size
    per_pass = [feistel_permute(np.arange(size), size, mix_seed(5, p)) for p in range(passes)]
    assert len({tuple(p) for p in per_pass}) == passes


# ---- ranges and shard-window shuffles ----------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 5000), a=st.integers(0, 5000), b=st.integers(0, 5000), seed=st.integers(0, 2**64 - 1))
def test_feistel_range_is_permute_of_arange(n, a, b, seed):
    from native.feistel import feistel_range

    lo, hi = sorted((a % (n + 1), b % (n + 1)))
    np.testing.assert_array_equal(feistel_range(lo, hi, n, seed), feistel_reference(np.arange(lo, hi), n, seed))


def shard_window_reference(start, stop, shard_rows, first_row, window, prefix):
    """Plain NumPy: windows of ``window`` shards in order, each window's rows permuted by its own Feistel seed."""
    out = []
    for w0 in range(0, len(shard_rows), window):
        rows = np.concatenate([np.arange(f, f + n) for f, n in zip(first_row[w0:w0 + window],
                                                                    shard_rows[w0:w0 + window])] + [[]])
        rows = rows.astype(np.int64)
        seed = int(mix_step(np.uint64(prefix), np.uint64(w0 // window))) & (2**63 - 1)
        out.append(rows[feistel_reference(np.arange(len(rows)), len(rows), seed)] if len(rows) else rows)
    return np.concatenate(out)[start:stop]


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 30), min_size=1, max_size=10), window=st.integers(1, 4),
       seed=st.integers(0, 2**40), cut=st.tuples(st.integers(0, 400), st.integers(0, 400)))
def test_shard_window_rows_matches_reference(sizes, window, seed, cut):
    from native.feistel import shard_window_rows

    sizes = np.array(sizes, dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])[::-1].copy()  # shards listed in reverse order
    sizes = sizes[::-1].copy()
    n = int(sizes.sum())
    lo, hi = sorted((cut[0] % (n + 1), cut[1] % (n + 1)))
    prefix = mix_prefix(seed)
    got = shard_window_rows(lo, hi, sizes, first, window, prefix)
    np.testing.assert_array_equal(got, shard_window_reference(lo, hi, sizes, first, window, prefix))
    if lo == 0 and hi == n:
        assert sorted(got.tolist()) == list(range(n))


def test_shard_window_rows_rejects_bad_input():
    from native.feistel import shard_window_rows

    with pytest.raises(ValueError, match="window must be >= 1"):
        shard_window_rows(0, 1, np.array([3]), np.array([0]), 0, 1)
    with pytest.raises(ValueError, match="need 0 <= start <= stop <= 3 rows"):
        shard_window_rows(0, 4, np.array([3]), np.array([0]), 1, 1)
