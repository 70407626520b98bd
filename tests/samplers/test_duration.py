"""DurationBucketSampler and the bin estimators: exactly-once, budget, shape per step, randomness, resume,
2D promotion/drop accounting, bad input."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from samplers import (
    DurationBucketSampler,
    estimate_duration_bins,
    estimate_duration_bins_2d,
)
from tests.helpers import (
    assert_exactly_once,
    assert_sampler_resumes_exactly,
    run_ranks_with_queue,
)


def issue_durations(n: int, seed: int = 0) -> np.ndarray:
    """The issue's mix: 60 % N(14.5, 1.7), 30 % U(1, 12), 10 % N(17, 4.5), clipped to [1, 35] s."""
    rng = np.random.default_rng(seed)
    a, b = int(0.6 * n), int(0.3 * n)
    d = np.concatenate([rng.normal(14.5, 1.7, a), rng.uniform(1, 12, b), rng.normal(17, 4.5, n - a - b)])
    return rng.permutation(d.clip(1, 35))


def per_rank(make, world_size):
    return [list(make(r)) for r in range(world_size)]


def padded_cost(d, q):
    return d if q is None else d + d * d / q


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("q, max_cuts", [(None, None), (30.0, None), (None, 7)])
def test_exactly_once_budget_and_same_bucket_per_step(world_size, q, max_cuts):
    d = issue_durations(3000, seed=world_size)
    kw = dict(max_duration=200.0, num_buckets=12, quadratic_duration=q, max_cuts=max_cuts, seed=3,
              world_size=world_size)
    batches = per_rank(lambda r: DurationBucketSampler(d, rank=r, **kw), world_size)
    s = DurationBucketSampler(d, rank=0, **kw)
    dropped = s.stats()["dropped_rows"]
    assert dropped == int((padded_cost(d, q) > 200.0).sum())
    assert_exactly_once(batches, len(d), dropped)
    for rank_batches in batches:
        for b in rank_batches:
            assert b.dtype == np.int64
            m = d[b].max()
            assert len(b) * padded_cost(m, q) <= 200.0 + 1e-9
            assert max_cuts is None or len(b) <= max_cuts
    # every rank's batch at step t comes from the same bucket
    bucket = s.bucket_of
    for t in range(len(batches[0])):
        ids = {int(bucket[batches[r][t][0]]) for r in range(world_size)}
        assert len(ids) == 1, f"step {t}: buckets {ids}"
        for r in range(world_size):
            assert len(set(bucket[batches[r][t]].tolist())) == 1


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 400), st.integers(1, 5), st.integers(0, 2**31), st.integers(0, 3), st.booleans(),
       st.integers(1, 10))
def test_property_exactly_once_any_world(n, world_size, seed, epoch, drop_last, num_buckets):
    d = np.random.default_rng(seed).uniform(0.5, 30, n)
    kw = dict(max_duration=60.0, num_buckets=num_buckets, seed=seed, world_size=world_size, drop_last=drop_last)
    usable = int((d <= 60).sum())
    if not drop_last and 0 < usable < world_size:
        with pytest.raises(ValueError, match="world_size"):
            DurationBucketSampler(d, rank=0, **kw)
        return
    samplers = [DurationBucketSampler(d, rank=r, **kw) for r in range(world_size)]
    for s in samplers:
        s.set_epoch(epoch)
    batches = [list(s) for s in samplers]
    st_ = samplers[0].stats()
    assert_exactly_once(batches, n, st_["dropped_rows"])
    if not drop_last:
        assert st_["dropped_rows"] == n - usable
    for t in range(len(batches[0])):
        assert len({int(samplers[0].bucket_of[batches[r][t][0]]) for r in range(world_size)}) == 1
    assert [len(s) for s in samplers] == [len(b) for b in batches]
    again = DurationBucketSampler(d, rank=0, **kw)
    again.set_epoch(epoch)
    assert all(np.array_equal(x, y) for x, y in zip(list(again), batches[0]))


def test_random_within_buckets_and_bucket_order_shuffled():
    d = issue_durations(4000)
    s = DurationBucketSampler(d, max_duration=300.0, num_buckets=10, seed=1)
    mates = []
    for e in range(2):
        s.set_epoch(e)
        owner = np.empty(len(d), np.int64)
        for i, b in enumerate(s):
            owner[b] = i
        mates.append(owner)
        groups = s.global_plan().groups
        assert not np.all(np.diff(groups) >= 0), "bucket order is sorted"
    # how many pairs of cuts batched together in epoch 0 are still together in epoch 1
    same0 = mates[0][:, None] == mates[0][None, :]
    same1 = mates[1][:, None] == mates[1][None, :]
    kept = (same0 & same1).sum() - len(d)
    assert kept / (same0.sum() - len(d)) < 0.3


def test_padding_and_batch_size_on_the_issue_distribution():
    d = issue_durations(100_000)
    s = DurationBucketSampler(d, max_duration=600.0, num_buckets=30)
    st_ = s.stats()
    assert st_["padding_fraction"] <= 0.012
    assert st_["mean_batch_size"] >= 45.0  # Lhotse's DynamicBucketingSampler: 45 at 4.8 % padding
    # plain bucketing (no sorted chunks) is Lhotse-like
    plain = DurationBucketSampler(d, max_duration=600.0, num_buckets=30, chunk_batches=0).stats()
    assert plain["padding_fraction"] > 3 * st_["padding_fraction"]
    assert sum(st_["batches_per_bucket"]) == st_["num_batches"]
    assert sum(st_["cuts_per_bucket"]) == len(d)


def test_stats_padding_matches_a_direct_count():
    d = issue_durations(2000, 5)
    s = DurationBucketSampler(d, max_duration=120.0, num_buckets=5)
    batches = list(s)
    padded = sum(len(b) * d[b].max() for b in batches)
    st_ = s.stats()
    assert st_["padding_fraction"] == pytest.approx(1 - d.sum() / padded)
    assert st_["mean_batch_size"] == pytest.approx(len(d) / len(batches))


def test_resumes_exactly():
    d = issue_durations(600, 2)
    make = lambda: DurationBucketSampler(d, max_duration=150.0, num_buckets=6, seed=9, rank=1, world_size=2)
    assert_sampler_resumes_exactly(make, epochs=2, steps=[0, 1, 5, 17, 10**6])


def test_state_rejects_other_options():
    d = issue_durations(300)
    s = DurationBucketSampler(d, max_duration=150.0)
    t = DurationBucketSampler(d, max_duration=100.0)
    with pytest.raises(ValueError, match="options"):
        t.load_state_dict(s.state_dict())


def test_bucket_batch_sizes_cap_each_bucket():
    d = issue_durations(3000)
    bins = estimate_duration_bins(d, 4)
    sizes = [40, 20, 10, 5]
    s = DurationBucketSampler(d, max_duration=None, bucket_bins=bins, bucket_batch_sizes=sizes)
    for b in s:
        assert len(b) <= sizes[int(s.bucket_of[b[0]])]
    assert s.stats()["max_batch_size"] == 40
    with pytest.raises(ValueError, match="bucket_batch_sizes must be 4 integers"):
        DurationBucketSampler(d, max_duration=None, bucket_bins=bins, bucket_batch_sizes=[1, 2])
    with pytest.raises(ValueError, match="max_duration must be given"):
        DurationBucketSampler(d, max_duration=None)


# ---------------------------------------------------------------------------------------------------------------
def test_1d_bins_match_lhotse():
    from lhotse.dataset.sampling.dynamic_bucketing import estimate_duration_buckets

    d = issue_durations(5000)

    class C:  # lhotse's TimeConstraint measures cut.duration
        def __init__(self, x):
            self.duration = x

    ref = estimate_duration_buckets([C(x) for x in d], num_buckets=30)
    np.testing.assert_allclose(estimate_duration_bins(d, 30), ref)


def test_1d_bins_equal_total_duration():
    d = issue_durations(20_000)
    bins = estimate_duration_bins(d, 10)
    tot = np.bincount(np.searchsorted(bins, d), weights=d, minlength=10)
    assert len(bins) == 9 and np.all(np.diff(bins) >= 0)
    assert tot.max() / tot.min() < 1.05


def make_2d(n=6000, seed=0):
    rng = np.random.default_rng(seed)
    d = issue_durations(n, seed)
    tok = np.maximum(0, np.round(d * rng.normal(3.0, 0.5, n))).astype(np.int64)
    out = rng.choice(n, 20, replace=False)
    tok[out] = (d[out] * 25).astype(np.int64)  # tokens-per-second outliers
    return d, tok, out


def test_2d_bins_equal_tokens_and_tps_filter():
    d, tok, out = make_2d()
    bins, tps = estimate_duration_bins_2d(d, tok, 6, 3, return_max_tps=True)
    assert bins.shape[1] == 2 and len(bins) == len(tps)
    assert np.array_equal(np.lexsort((bins[:, 1], bins[:, 0])), np.arange(len(bins)))
    assert bins[:, 0].max() == pytest.approx(d.max())
    # outliers are not in the estimate: no bin's token bound reaches their count
    assert tps.max() < 25 * 0.9
    # inside one duration bin the sub-buckets carry similar total tokens
    from native.duration import assign_buckets_2d

    b, _ = assign_buckets_2d(d, tok, bins, strict=True)
    first = bins[:, 0] == bins[0, 0]
    tot = np.bincount(b[b >= 0], weights=tok[b >= 0], minlength=len(bins))[first]
    assert tot.max() / tot.min() < 1.5


@pytest.mark.parametrize("strict", [False, True])
def test_2d_promotion_and_drop_accounting(strict):
    d, tok, out = make_2d()
    bins = estimate_duration_bins_2d(d, tok, 6, 2)
    s = DurationBucketSampler(d, max_duration=400.0, output_lengths=tok, bucket_bins=bins, strict_2d=strict)
    from native.duration import assign_buckets_2d

    ref, prom = assign_buckets_2d(d, tok, bins, strict)
    st_ = s.stats()
    too_long = d > 400
    if strict:
        assert st_["dropped"].get("outside_2d_bins", 0) == int(((ref < 0) & ~too_long).sum()) > 0
        assert st_["promoted"] == 0
    else:
        assert st_["promoted"] == st_["promoted_by_reason"]["to_fit_2d_bins"] == int(prom.sum()) > 0
        assert st_["dropped"].get("outside_2d_bins", 0) == int(((ref < 0) & ~too_long).sum())
    assert st_["discarded"] == st_["dropped_rows"] == sum(st_["dropped"].values())
    assert_exactly_once([list(s)], len(d), st_["dropped_rows"])
    # every batch respects its bucket's token bound
    for b in s:
        k = int(s.bucket_of[b[0]])
        assert tok[b].max() <= bins[k, 1] and d[b].max() <= bins[k, 0]
    assert "token_padding_fraction" in st_
    assert s.bucket_shapes == [tuple(x) for x in bins.tolist()]


def test_2d_estimated_when_output_lengths_given():
    d, tok, _ = make_2d(2000)
    s = DurationBucketSampler(d, max_duration=300.0, output_lengths=tok, num_buckets=5, num_sub_buckets=2)
    assert s.is_2d and s.num_buckets == len(s.bins) <= 10
    with pytest.raises(ValueError, match="need output_lengths"):
        DurationBucketSampler(d, max_duration=300.0, bucket_bins=s.bins)


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, match", [(np.nan, "NaN/inf at row 3"), (-1.0, "must be > 0: row 3"),
                                          (0.0, "must be > 0: row 3"), (np.inf, "NaN/inf at row 3")])
def test_bad_durations_raise(value, match):
    d = np.ones(6)
    d[3] = value
    with pytest.raises(ValueError, match=match):
        DurationBucketSampler(d, max_duration=10.0)


def test_longer_than_max_duration_dropped_or_error():
    d = np.array([1.0, 2.0, 50.0, 3.0, 70.0])
    s = DurationBucketSampler(d, max_duration=10.0, num_buckets=2)
    assert s.stats()["dropped"] == {"longer_than_max_duration": 2}
    assert sorted(np.concatenate(list(s)).tolist()) == [0, 1, 3]
    with pytest.raises(ValueError, match="cut 2 lasts 50.000 s, over max_duration=10.0"):
        DurationBucketSampler(d, max_duration=10.0, on_long="error")


@pytest.mark.parametrize("kw, match", [
    (dict(max_duration=0.0), "max_duration must be a number > 0"),
    (dict(max_duration=10.0, quadratic_duration=-1.0), "quadratic_duration must be > 0"),
    (dict(max_duration=10.0, max_cuts=0), "max_cuts must be an integer >= 1"),
    (dict(max_duration=10.0, num_buckets=0), "num_buckets must be an integer >= 1"),
    (dict(max_duration=10.0, bucket_bins=[3.0, 1.0]), "non-decreasing"),
    (dict(max_duration=10.0, chunk_batches=-1), "chunk_batches must be"),
])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        DurationBucketSampler(np.arange(1.0, 20.0), **kw)


def test_small_buckets_move_up_for_many_ranks():
    d = np.concatenate([[0.5], np.full(50, 5.0), np.full(50, 9.0)])
    s = DurationBucketSampler(d, max_duration=30.0, bucket_bins=[1.0, 6.0], rank=0, world_size=4)
    assert s.stats()["promoted_by_reason"]["from_small_bucket"] == s.stats()["promoted"] == 1
    assert_exactly_once([list(DurationBucketSampler(d, max_duration=30.0, bucket_bins=[1.0, 6.0], rank=r,
                                                    world_size=4)) for r in range(4)], len(d))


def test_empty_and_tiny_inputs():
    s = DurationBucketSampler(np.zeros(0), max_duration=10.0)
    assert list(s) == [] and s.stats()["padding_fraction"] == 0.0
    s = DurationBucketSampler([3.0], max_duration=10.0)
    assert [b.tolist() for b in s] == [[0]]


# ---- a real gloo group: ranks from torch.distributed share every step's bucket and split the cuts -------------
def _gloo_worker(rank, world, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        d = issue_durations(5000, 11)
        s = DurationBucketSampler(d, max_duration=300.0, num_buckets=20, seed=5)  # rank/world from torch.distributed
        s.set_epoch(1)
        batches = [b.tolist() for b in s]
        gathered = [None] * world
        dist.all_gather_object(gathered, (s.rank, s.world_size, [int(s.bucket_of[b[0]]) for b in batches], batches))
        if rank == 0:
            out.put(gathered)
    finally:
        dist.destroy_process_group()


def test_gloo_ranks_agree_on_buckets_and_split_the_cuts():
    gathered = run_ranks_with_queue(_gloo_worker, 2)
    (r0, w0, k0, b0), (r1, w1, k1, b1) = gathered
    assert (r0, r1, w0, w1) == (0, 1, 2, 2)
    assert k0 == k1 and len(b0) == len(b1) > 0
    assert_exactly_once([[np.array(b, np.int64) for b in b0], [np.array(b, np.int64) for b in b1]], 5000,
                        int((issue_durations(5000, 11) > 300).sum()))
