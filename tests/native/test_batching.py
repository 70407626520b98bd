import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from native.batching import budget_cuts, fixed_sizes, split_to_multiple


def budget_cuts_reference(lengths, max_tokens, max_rows=None):
    cuts, cur_n, cur_max = [0], 0, 0
    for i, L in enumerate(lengths):
        new_max = max(cur_max, L)
        if cur_n > 0 and ((cur_n + 1) * new_max > max_tokens or (max_rows and cur_n + 1 > max_rows)):
            cuts.append(i)
            cur_n, cur_max = 1, L
        else:
            cur_n, cur_max = cur_n + 1, new_max
    if cur_n:
        cuts.append(len(lengths))
    return np.array(cuts)


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(0, 300), max_size=300), max_tokens=st.integers(1, 2000),
       max_rows=st.one_of(st.none(), st.integers(1, 20)))
def test_budget_cuts_matches_reference_and_budget(lengths, max_tokens, max_rows):
    L = np.array(lengths, dtype=np.int64)
    cuts = budget_cuts(L, max_tokens, max_rows)
    np.testing.assert_array_equal(cuts, budget_cuts_reference(lengths, max_tokens, max_rows))
    for a, b in zip(cuts[:-1], cuts[1:]):
        assert b > a
        if b - a > 1:  # a single over-long row may stand alone
            assert (b - a) * L[a:b].max() <= max_tokens
        if max_rows:
            assert b - a <= max_rows


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(1, 50), min_size=1, max_size=40), w=st.integers(1, 16))
def test_split_to_multiple(sizes, w):
    s = np.array(sizes)
    need = -(-len(s) // w) * w
    if s.sum() < need:
        with pytest.raises(ValueError, match="cannot give each"):
            split_to_multiple(s, w)
        return
    out = split_to_multiple(s, w)
    assert len(out) % w == 0 and out.sum() == s.sum() and out.min() >= 1
    assert out.max() <= s.max()


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 500), bs=st.integers(1, 40), w=st.integers(1, 16), drop=st.booleans())
def test_fixed_sizes(n, bs, w, drop):
    sizes = fixed_sizes(n, bs, w, drop)
    assert len(sizes) % w == 0
    assert (sizes <= bs).all() and (sizes >= 1).all()
    if drop:
        assert (sizes == bs).all() and n - sizes.sum() < bs * w
    elif -(-n // (bs * w)) * w > n:  # too few rows to give every rank a batch at the last step
        assert n - sizes.sum() < w * bs
    else:
        assert sizes.sum() == n


def test_budget_cuts_bad_input():
    with pytest.raises(ValueError, match="max_tokens"):
        budget_cuts(np.array([1, 2]), 0)
    with pytest.raises(ValueError, match="max_rows"):
        budget_cuts(np.array([1, 2]), 5, 0)
