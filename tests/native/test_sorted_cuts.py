"""native.sorted_cuts: the chunk sort and budget cut of every token-budget and duration-bucket plan, against a
plain-Python reference (Python's stable ``sorted`` and the cut rule written out), for both cost rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from native.batching import budget_cuts
from native.duration import bucket_batches
from native.sorted_cuts import sort_chunk, sorted_cuts


def ref_sorted_cuts(keys, rows, seg_offsets, chunk_rows, caps, alternate, budget, quad):
    """Sort each chunk of each segment (stable; every second chunk descending with ``alternate``), then cut
    greedily: a batch of ``n`` rows whose largest key is ``m`` keeps ``n * cost(m) <= budget`` and ``n <= cap``."""
    keys, rows = list(keys), list(rows)
    out_k, out_r, offsets, groups = [], [], [0], []
    for g in range(len(seg_offsets) - 1):
        pairs = list(zip(keys[seg_offsets[g]:seg_offsets[g + 1]], rows[seg_offsets[g]:seg_offsets[g + 1]]))
        if not pairs:
            continue
        w = chunk_rows[g]
        if w > 1:
            chunks = [pairs[c:c + w] for c in range(0, len(pairs), w)]
            pairs = [p for i, ch in enumerate(chunks)
                     for p in sorted(ch, key=lambda kr: kr[0], reverse=alternate and i % 2 == 1)]
        n, top = 0, 0
        for t, (k, _) in enumerate(pairs):
            m = max(top, k)
            cost = m + m * m / quad if quad else m
            if n > 0 and ((n + 1) * cost > budget or n + 1 > caps[g]):
                offsets.append(len(out_k) + t)
                groups.append(g)
                n, top = 1, k
            else:
                n, top = n + 1, m
        offsets.append(len(out_k) + len(pairs))
        groups.append(g)
        out_k += [k for k, _ in pairs]
        out_r += [r for _, r in pairs]
    return out_k, out_r, offsets, groups


def segments(draw, n):
    k = draw(st.integers(1, 5))
    cuts = sorted(draw(st.lists(st.integers(0, n), min_size=k - 1, max_size=k - 1)))
    return [0, *cuts, n]


def check(keys, seg, chunk, caps, alternate, budget, quad):
    rows = np.random.default_rng(len(keys)).permutation(len(keys)).astype(np.int64)
    got = sorted_cuts(keys, rows, budget=budget, seg_offsets=seg, chunk_rows=chunk, caps=caps, alternate=alternate,
                      quadratic=quad)
    want = ref_sorted_cuts(keys.tolist(), rows.tolist(), seg, chunk, caps, alternate, budget, quad)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, np.array(w, dtype=g.dtype))
    return got


@st.composite
def int_case(draw):
    n = draw(st.integers(0, 400))
    # lengths with many ties, sometimes wider than two bytes (more radix digits), sometimes negative (fallback)
    hi = draw(st.sampled_from([5, 300, 70_000, 2**40]))
    lo = draw(st.sampled_from([0, 0, -50]))
    keys = np.array(draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n)), dtype=np.int64)
    seg = segments(draw, n)
    k = len(seg) - 1
    chunk = draw(st.lists(st.sampled_from([0, 1, 2, 7, 64, 1000]), min_size=k, max_size=k))
    caps = draw(st.lists(st.integers(1, 40), min_size=k, max_size=k))
    budget = draw(st.integers(1, 3 * hi))
    return keys, seg, chunk, caps, draw(st.booleans()), budget


@settings(max_examples=80, deadline=None)
@given(int_case())
def test_linear_rule_on_integer_keys_matches_reference(case):
    keys, seg, chunk, caps, alternate, budget = case
    k, _, off, _ = check(keys, seg, chunk, caps, alternate, budget, None)
    assert k.dtype == np.int64
    for a, b in zip(off[:-1], off[1:]):  # every batch of two rows or more is within the budget
        assert b - a == 1 or ((b - a) * max(int(k[a:b].max()), 0) <= budget)


@st.composite
def float_case(draw):
    n = draw(st.integers(0, 300))
    pool = draw(st.sampled_from(["ties", "float32", "any", "signed"]))
    if pool == "ties":
        vals = st.sampled_from([0.5, 1.25, 3.0, 3.0000000000000004, 7.5, 19.0])
    elif pool == "signed":  # negative keys and -0.0: the merge-sort fallback
        vals = st.sampled_from([-2.0, -0.0, 0.0, 1.5, 4.0])
    else:
        vals = st.floats(0.125, 40.0, width=32 if pool == "float32" else 64)
    keys = np.array(draw(st.lists(vals, min_size=n, max_size=n)), dtype=np.float64)
    seg = segments(draw, n)
    k = len(seg) - 1
    chunk = draw(st.lists(st.sampled_from([0, 1, 3, 16, 500]), min_size=k, max_size=k))
    caps = draw(st.lists(st.integers(1, 60), min_size=k, max_size=k))
    budget = draw(st.sampled_from([20.0, 150.0, 600.0, math.inf]))
    quad = draw(st.sampled_from([None, 5.0, 30.0]))
    return keys, seg, chunk, caps, draw(st.booleans()), budget, quad


@settings(max_examples=80, deadline=None)
@given(float_case())
def test_linear_and_quadratic_rules_on_float_keys_match_reference(case):
    keys, seg, chunk, caps, alternate, budget, quad = case
    k, _, off, groups = check(keys, seg, chunk, caps, alternate, budget, quad)
    assert k.dtype == np.float64
    assert np.array_equal(groups, np.sort(groups))  # batches come segment by segment
    for a, b in zip(off[:-1], off[1:]):  # every batch of two rows or more is within the budget
        m = max(float(k[a:b].max()), 0.0)
        assert b - a == 1 or (b - a) * (m + m * m / quad if quad else m) <= budget


def test_radix_sort_is_the_stable_order_on_large_chunks():
    """Two chunks of 50,000 keys with every byte of the bit patterns in play, many tied: the first in the order of
    a stable merge sort of the keys, the second (``alternate``) of the negated keys, for integer and float keys."""
    rng = np.random.default_rng(3)
    m = 50_000
    for keys in (rng.integers(0, 2**50, m) // 7, rng.lognormal(1.5, 1, m).astype(np.float32).astype(np.float64)):
        keys = np.repeat(keys, 2)[:m]  # ties
        both = np.concatenate([keys, keys])
        budget = np.inf if keys.dtype.kind == "f" else 2**62
        _, got, _, _ = sorted_cuts(both, np.arange(2 * m), budget=budget, chunk_rows=m, alternate=True)
        np.testing.assert_array_equal(got[:m], np.argsort(keys, kind="mergesort"))
        np.testing.assert_array_equal(got[m:], m + np.argsort(-keys, kind="mergesort"))


@pytest.mark.parametrize("spread", [2.0**-50, 2.0**-30, 2.0**-20, 1e-3, 0.5, 40.0])
@pytest.mark.parametrize("with_rows", [False, True])
def test_float_chunks_of_any_spread_sort_stably(spread, with_rows):
    """Float keys radix their upper four bytes and leave ties below to the insertion pass: keys that differ only in
    their low bytes (a narrow spread), in some or all bytes, ascending and descending, keys alone or with rows."""
    rng = np.random.default_rng(int(spread * 1e3) % 97)
    keys = 5.0 + np.round(rng.uniform(0, 1, 3_000) * 400) / 400 * spread  # ties too
    for descending in (False, True):
        k, r = keys.copy(), np.arange(len(keys), dtype=np.int64)
        sort_chunk(k, r, with_rows, descending, np.empty_like(k), np.empty_like(r))
        want = np.argsort(-keys if descending else keys, kind="mergesort")
        np.testing.assert_array_equal(k, keys[want])
        if with_rows:
            np.testing.assert_array_equal(r, want)


def test_descending_chunks_are_the_stable_order_of_negated_keys():
    rng = np.random.default_rng(4)
    keys = np.round(rng.uniform(0.5, 20, 9_000), 1)  # many ties
    rows = np.arange(len(keys), dtype=np.int64)
    w = 3_000
    _, got, _, _ = sorted_cuts(keys, rows, budget=np.inf, chunk_rows=w, alternate=True)
    want = np.concatenate([c0 + np.argsort(keys[c0:c0 + w] if i % 2 == 0 else -keys[c0:c0 + w], kind="mergesort")
                           for i, c0 in enumerate(range(0, len(keys), w))])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("keys, quad, budget, sizes", [
    ([3, 3, 3, 3], None, 9, [3, 1]),  # 3 * 3 == 9: a batch exactly at the budget is kept
    ([2.0, 2.0, 2.0, 2.0], 4.0, 9.0, [3, 1]),  # 3 * (2 + 2**2 / 4) == 9.0
    ([2.0, 2.0, 2.0, 2.0], 4.0, 8.999, [2, 2]),
    ([-50.0, -50.0], 5.0, 100.0, [2]),  # the running maximum starts at 0, as the cuts always did
])
def test_cut_rule_at_the_budget(keys, quad, budget, sizes):
    _, _, off, _ = sorted_cuts(np.array(keys), np.arange(len(keys)), budget=budget, quadratic=quad)
    assert np.diff(off).tolist() == sizes


def test_nan_keys_take_the_merge_sort_order():
    keys = np.array([3.0, np.nan, 1.0, 2.0, np.nan, 1.0, 0.5, 7.0])
    _, got, _, _ = sorted_cuts(np.concatenate([keys, keys]), np.arange(16), budget=np.inf, chunk_rows=8,
                               alternate=True)
    np.testing.assert_array_equal(got[:8], np.argsort(keys, kind="mergesort"))
    np.testing.assert_array_equal(got[8:], 8 + np.argsort(-keys, kind="mergesort"))


def test_callers_are_this_kernel():
    """``budget_cuts`` is the linear rule on one unsorted segment; ``bucket_batches`` (exact duration plans,
    unshuffled) is the alternating chunk sort with the quadratic rule, per bucket."""
    rng = np.random.default_rng(5)
    lengths = rng.integers(0, 500, 3_000)
    _, _, off, _ = sorted_cuts(lengths, np.arange(3_000), budget=2_000, caps=17)
    np.testing.assert_array_equal(budget_cuts(lengths, 2_000, 17), off)
    dur = rng.uniform(0.3, 30, 3_000).astype(np.float32)
    rows = np.arange(3_000, dtype=np.int64)
    seg = np.array([0, 700, 700, 2_500, 3_000])
    chunk, caps = np.array([40, 9, 0, 200]), np.array([50, 3, 8, 10**9])
    idx, off2, groups = bucket_batches(rows, seg, dur, chunk, caps, 300.0, 25.0, False, 0)
    _, r, off, g = sorted_cuts(dur.astype(np.float64), rows, budget=300.0, seg_offsets=seg, chunk_rows=chunk,
                               caps=caps, alternate=True, quadratic=25.0)
    for a, b in ((idx, r), (off2, off), (groups, g)):
        np.testing.assert_array_equal(a, b)


def test_inputs_are_not_modified():
    keys = np.array([5, 1, 4, 2], dtype=np.int64)
    rows = np.arange(4, dtype=np.int64)
    k, r, _, _ = sorted_cuts(keys, rows, budget=100, chunk_rows=4)
    assert k.tolist() == [1, 2, 4, 5] and r.tolist() == [1, 3, 2, 0]
    assert keys.tolist() == [5, 1, 4, 2] and rows.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("kw, match", [
    (dict(budget=0), r"budget must be > 0 \(got budget=0\)"),
    (dict(budget=10.5), r"budget must be an integer with integer keys"),
    (dict(budget=10, quadratic=0.0), r"quadratic must be > 0 or None"),
    (dict(budget=10, caps=0), r"caps must be >= 1"),
    (dict(budget=10, seg_offsets=[0, 2]), r"seg_offsets must be non-decreasing from 0 to len\(keys\)=3"),
    (dict(budget=10, seg_offsets=[0, 3, 1, 3]), r"seg_offsets must be non-decreasing"),
    (dict(budget=10, rows=np.arange(2)), r"rows must have the shape of keys, \(3,\) \(got \(2,\)\)"),
    (dict(budget=10, seg_offsets=[0, 1, 3], chunk_rows=[4, 4, 4]),
     r"chunk_rows must be one integer or one per segment, 2 \(got shape \(3,\)\)"),
    (dict(budget=10, caps=[[1]]), r"caps must be one integer or one per segment"),
])
def test_bad_arguments_name_the_parameter(kw, match):
    rows = kw.pop("rows", np.arange(3))
    with pytest.raises(ValueError, match=match):
        sorted_cuts(np.array([1, 2, 3]), rows, **kw)
