import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import samplers
from tests.helpers import assert_exactly_once, assert_sampler_resumes_exactly


def run_all_ranks(make, w):
    return [list(make(r)) for r in range(w)]


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 400), bs=st.integers(1, 50), w=st.integers(1, 16), seed=st.integers(0, 2**32),
       epoch=st.integers(0, 5), drop_last=st.booleans())
def test_exactly_once_across_ranks(n, bs, w, seed, epoch, drop_last):
    if w > n and not drop_last:
        with pytest.raises(ValueError, match="world_size"):
            samplers.RandomBatchSampler(n, bs, world_size=w, rank=0)
        return

    def make(r):
        s = samplers.RandomBatchSampler(n, bs, seed=seed, world_size=w, rank=r, drop_last=drop_last)
        s.set_epoch(epoch)
        return s

    per_rank = run_all_ranks(make, w)
    st_ = make(0).stats()
    assert_exactly_once(per_rank, n, dropped=st_["dropped_rows"])
    for b in per_rank[0]:
        assert 1 <= len(b) <= bs
    if drop_last:
        assert all(len(b) == bs for r in per_rank for b in r)
        assert st_["dropped_rows"] == n - (n // (bs * w)) * bs * w
    assert len(make(0)) == len(per_rank[0])


def test_same_seed_same_order_and_epochs_differ():
    a = samplers.RandomBatchSampler(100, 10, seed=3)
    b = samplers.RandomBatchSampler(100, 10, seed=3)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    first = [x.tolist() for x in a]
    a.set_epoch(1)
    assert [x.tolist() for x in a] != first
    c = samplers.RandomBatchSampler(100, 10, seed=4)
    assert [x.tolist() for x in c] != first


def test_no_shuffle_is_ordered():
    s = samplers.RandomBatchSampler(10, 4, shuffle=False)
    assert np.concatenate(list(s)).tolist() == list(range(10))


@pytest.mark.parametrize("w,r", [(1, 0), (3, 2)])
def test_resume_every_step(w, r):
    assert_sampler_resumes_exactly(lambda: samplers.RandomBatchSampler(53, 4, seed=11, world_size=w, rank=r))


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_rows=10, batch_size=0), "batch_size must be"),
    (dict(num_rows=-1, batch_size=2), "num_rows must be"),
    (dict(num_rows=3, batch_size=2, world_size=4, rank=0), "world_size=4 is larger than num_rows=3"),
    (dict(num_rows=3, batch_size=2, world_size=2, rank=2), "rank must be in"),
    (dict(num_rows=3, batch_size=2, world_size=0, rank=0), "world_size must be"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        samplers.RandomBatchSampler(**kwargs)


def test_state_rejects_unknown_keys_other_options_and_other_samplers():
    s = samplers.RandomBatchSampler(20, 3, world_size=2, rank=0)
    st_ = s.state_dict()
    with pytest.raises(ValueError, match="unknown keys"):
        s.load_state_dict({**st_, "bogus": 1})
    samplers.RandomBatchSampler(20, 3, world_size=4, rank=0).load_state_dict(st_)  # elastic: accepted
    with pytest.raises(ValueError, match="batch_size"):
        samplers.RandomBatchSampler(20, 4, world_size=2, rank=0).load_state_dict(st_)
    with pytest.raises(ValueError, match="seed"):
        samplers.RandomBatchSampler(20, 3, world_size=2, rank=0, seed=9).load_state_dict(st_)
    with pytest.raises(ValueError, match="saved by"):
        samplers.TokenBudgetBatchSampler(np.ones(20, int), 4).load_state_dict(st_)


def test_state_is_small_ints_and_strings():
    s = samplers.RandomBatchSampler(20, 3)
    it = iter(s)
    next(it)
    st_ = s.state_dict()
    assert json.loads(json.dumps(st_)) == st_ and len(json.dumps(st_)) < 1024
    assert st_["batches_yielded"] == 1


def test_new_iter_is_a_new_pass_unless_restored():
    s = samplers.RandomBatchSampler(40, 4, seed=1)
    full = [b.tolist() for b in s]
    it = iter(s)
    next(it), next(it)
    assert s.state_dict()["batches_yielded"] == 2
    assert [b.tolist() for b in s] == full  # an abandoned pass does not shorten the next one
    t = samplers.RandomBatchSampler(40, 4, seed=1)
    t.load_state_dict({**s.state_dict(), "batches_yielded": 3})
    assert [b.tolist() for b in t] == full[3:]  # a restored cursor does
    assert [b.tolist() for b in t] == full


def test_empty_dataset_gives_no_batches():
    s = samplers.RandomBatchSampler(0, 4, world_size=2, rank=1)
    assert len(s) == 0 and list(s) == []
    t = samplers.TokenBudgetBatchSampler(np.zeros(0, np.int64), 8)
    assert len(t) == 0 and list(t) == [] and t.stats()["rows"] == 0
    u = samplers.TokenBudgetBatchSampler(np.array([50, 60]), 8)  # every row too long: dropped and counted
    assert len(u) == 0 and u.stats()["dropped"] == {"longer_than_max_tokens": 2}
