"""Nothing dropped quietly (issue 13): a plan that drops rows, or repeats them beyond what was asked, emits one
``samplers.PlanWarning`` per epoch with the counts, the share lost and the option that changes it;
``strict=True`` makes it a ``ValueError``; lengths that do not fit int64 are refused."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import samplers
from mixtures.schedules import Constant


def plan_warnings(fn):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in rec if issubclass(w.category, samplers.PlanWarning)]


def test_token_budget_rows_over_the_budget_warn_once_per_epoch():
    lengths = np.full(100, 10)
    lengths[[3, 17, 40, 41, 99]] = 500
    s, rec = plan_warnings(lambda: samplers.TokenBudgetBatchSampler(lengths, max_tokens=100, seed=0))
    assert rec == []  # planned lazily: the warning comes with the plan
    batches, rec = plan_warnings(lambda: list(s))
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "drops 5 rows" in msg and "longer_than_max_tokens" in msg and "max_tokens" in msg and "%" in msg
    assert sum(len(b) for b in batches) == 95
    _, rec = plan_warnings(lambda: (list(s), len(s), s.stats()))
    assert rec == []  # once per epoch
    s.set_epoch(1)
    _, rec = plan_warnings(lambda: list(s))
    assert len(rec) == 1
    with pytest.raises(ValueError, match="5 rows"):
        samplers.TokenBudgetBatchSampler(lengths, max_tokens=100, strict=True)


def test_nothing_dropped_nothing_said():
    _, rec = plan_warnings(lambda: list(samplers.TokenBudgetBatchSampler(np.full(50, 10), max_tokens=100)))
    assert rec == []
    _, rec = plan_warnings(lambda: list(samplers.RandomBatchSampler(50, 8, drop_last=True)))
    assert rec == []  # drop_last=True asked for the drop


def test_duration_below_every_cut_says_the_epoch_is_empty():
    d = np.random.default_rng(0).uniform(5, 10, 40)
    s, _ = plan_warnings(lambda: samplers.DurationBucketSampler(d, max_duration=2.0, num_buckets=2))
    batches, rec = plan_warnings(lambda: list(s))
    assert batches == [] and len(rec) == 1 and "drops 40 rows" in str(rec[0].message)
    with pytest.raises(ValueError, match="max_duration"):
        samplers.DurationBucketSampler(d, max_duration=2.0, num_buckets=2, strict=True)


def test_mixture_read_many_passes_warns_unless_max_repeat_is_set():
    sched = Constant({"small": 0.5, "big": 0.5})
    make = lambda **kw: samplers.MixtureBatchSampler({"small": 10, "big": 10_000}, sched, batch_size=20,
                                                     total_steps=64, **kw)
    _, rec = plan_warnings(make)
    assert len(rec) == 1 and "'small' 64.0 passes" in str(rec[0].message)
    _, rec = plan_warnings(lambda: make(max_repeat=100))
    assert rec == []
    with pytest.raises(ValueError, match="passes"):
        make(strict=True)


@pytest.mark.parametrize("values", [np.array([3, 2**63 + 10], dtype=np.uint64), np.array([3.0, 1e30])])
def test_lengths_that_do_not_fit_int64_are_refused(values):
    with pytest.raises(ValueError, match="row 1"):
        samplers.TokenBudgetBatchSampler(values, max_tokens=100)


def test_budget_that_overflows_is_refused():
    with pytest.raises(ValueError, match="overflow"):
        samplers.TokenBudgetBatchSampler(np.full(4, 2**61), max_tokens=2**62)


SHARED_KEYS = {"epoch", "num_batches", "batches_per_rank", "rows", "mean_batch_size", "min_batch_size",
               "max_batch_size", "dropped_rows", "dropped", "repeated"}


def every_sampler():
    from mixtures.schedules import DomainUpsampling
    from tests.samplers.test_decomposed import make_index
    from tests.samplers.test_shaped_mixture import make_indexes

    rng = np.random.default_rng(0)
    d = rng.lognormal(1, 0.6, 300).clip(0.3, 30)
    emb = rng.normal(size=(300, 8)).astype(np.float32)
    return {
        "random": samplers.RandomBatchSampler(300, 7),
        "token_budget": samplers.TokenBudgetBatchSampler(np.arange(300) % 50 + 1, max_tokens=200),
        "duration": samplers.DurationBucketSampler(d, max_duration=40.0, num_buckets=4),
        "packed": samplers.PackedDurationSampler(d, max_duration=30.0),
        "decomposed": samplers.DecomposedBatchSampler(make_index(n=3000, sigma=1.0), tokens_per_batch=1024),
        "topic_aware": samplers.TopicAwareBatchSampler(np.arange(300) % 9, batch_size=8),
        "ngame": samplers.NGAMEBatchSampler(300, batch_size=10, cluster_size=5, embeddings=emb),
        "mixture": samplers.MixtureBatchSampler({"a": 100, "b": 200}, Constant({"a": 0.5, "b": 0.5}), batch_size=8,
                                                total_steps=10),
        "shaped_mixture": samplers.ShapedMixtureBatchSampler.from_decomposed(
            make_indexes(n=300, mus=(6.0, 7.0)), DomainUpsampling({"a": 0.5, "b": 0.5}, {"a": 0.2, "b": 0.8},
                                                                  final_fraction=0.2),
            tokens_per_batch=4096, total_steps=20, world_size=2, rank=0),
    }


@pytest.mark.filterwarnings("ignore::samplers.PlanWarning")
def test_every_sampler_reports_json_stats_with_the_shared_keys_and_takes_strict():
    import inspect
    import json

    import typing

    hints = typing.get_type_hints(samplers.PlanStats)
    assert set(hints) == samplers.PlanStats.__required_keys__ == SHARED_KEYS
    for name, s in every_sampler().items():
        st_ = s.stats()
        assert SHARED_KEYS <= set(st_), (name, SHARED_KEYS - set(st_))
        for key, hint in hints.items():  # the types PlanStats declares (a dict of str -> int for drops and repeats)
            assert isinstance(st_[key], typing.get_origin(hint) or hint), (name, key, st_[key])
            if typing.get_origin(hint) is dict:
                assert all(type(k) is str and type(v) is int for k, v in st_[key].items()), (name, key, st_[key])
        assert json.loads(json.dumps(st_)) is not None, name
        assert st_["dropped_rows"] == sum(st_["dropped"].values()), name
        params = inspect.signature(type(s).__init__).parameters
        for kw in ("seed", "rank", "world_size", "strict"):
            assert params[kw].kind is inspect.Parameter.KEYWORD_ONLY, (name, kw)
        assert json.loads(json.dumps(s.state_dict())) == s.state_dict(), name
