import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import samplers
from tests.helpers import assert_exactly_once, assert_sampler_resumes_exactly


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 200), min_size=1, max_size=300), max_tokens=st.integers(50, 1000),
       w=st.integers(1, 16), seed=st.integers(0, 1000), window=st.sampled_from([1, 8, 1024]))
def test_budget_and_exactly_once(lengths, max_tokens, w, seed, window):
    L = np.array(lengths)
    usable = int((L <= max_tokens).sum())
    if 0 < usable < w:
        with pytest.raises(ValueError, match="world_size"):
            samplers.TokenBudgetBatchSampler(L, max_tokens, world_size=w, rank=0)
        return
    per_rank = [list(samplers.TokenBudgetBatchSampler(L, max_tokens, seed=seed, world_size=w, rank=r,
                                                      sort_window=window)) for r in range(w)]
    s = samplers.TokenBudgetBatchSampler(L, max_tokens, seed=seed, world_size=w, rank=0, sort_window=window)
    st_ = s.stats()
    assert st_["dropped"].get("longer_than_max_tokens", 0) == len(L) - usable
    # only tiny epochs that cannot be split evenly over w ranks may drop a counted tail
    assert set(st_["dropped"]) <= {"longer_than_max_tokens", "uneven_tail_too_few_rows_to_split"}
    assert_exactly_once(per_rank, len(L), dropped=st_["dropped_rows"])
    for rank in per_rank:
        for b in rank:
            assert len(b) * L[b].max() <= max_tokens


def test_sorting_windows_reduce_padding():
    L = np.random.default_rng(0).lognormal(5, 1, 20000).astype(int) + 1
    plain = samplers.TokenBudgetBatchSampler(L, 8192, sort_window=1).stats()["padding_fraction"]
    tight = samplers.TokenBudgetBatchSampler(L, 8192, sort_window=1024).stats()["padding_fraction"]
    assert tight < 0.1 < 0.3 < plain


def test_batch_mates_change_between_epochs():
    L = np.random.default_rng(1).integers(1, 100, 2000)
    s = samplers.TokenBudgetBatchSampler(L, 1000)
    e0 = {tuple(sorted(b.tolist())) for b in s}
    s.set_epoch(1)
    e1 = {tuple(sorted(b.tolist())) for b in s}
    assert len(e0 & e1) < 0.1 * len(e0)


def test_resume():
    L = np.random.default_rng(2).integers(1, 60, 300)
    assert_sampler_resumes_exactly(lambda: samplers.TokenBudgetBatchSampler(L, 400, seed=5, world_size=2, rank=1))


def test_bad_lengths():
    with pytest.raises(ValueError, match="negative value -1 at row 1"):
        samplers.TokenBudgetBatchSampler(np.array([3, -1]), 10)
    with pytest.raises(ValueError, match="NaN"):
        samplers.TokenBudgetBatchSampler(np.array([3.0, np.nan]), 10)
    with pytest.raises(ValueError, match="max_tokens"):
        samplers.TokenBudgetBatchSampler(np.array([3]), 0)
    with pytest.raises(ValueError, match="row 0 has length 30 > max_tokens=10"):
        samplers.TokenBudgetBatchSampler(np.array([30, 2]), 10, on_long="error")


@pytest.mark.parametrize("lengths,n,err,match", [
    ([1.5, 2.0], None, ValueError, "lengths must be whole numbers: row 0 has 1.5"),
    ([[1, 2]], None, ValueError, r"lengths must have shape 1-D"),
    ([1, 2], 3, ValueError, r"lengths must have shape \(3,\)"),
    (["a"], None, TypeError, "lengths must be integers"),
])
def test_shared_length_validator(lengths, n, err, match):
    from samplers.base import check_lengths

    with pytest.raises(err, match=match):
        check_lengths(np.array(lengths), "lengths", n)
    assert check_lengths(np.array([3.0, 0.0])).tolist() == [3, 0]
