"""ShapedMixtureBatchSampler: schedule mixtures inside shaped batches (decomposed buckets, duration and length
buckets, plain random batches), exact resume, equal shapes across ranks, passes and PlanWarnings."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtures.schedules import Constant, DomainUpsampling, Linear
from samplers import ShapedMixtureBatchSampler as S
from samplers.base import PlanWarning
from tests.helpers import assert_sampler_resumes_exactly

BASE = {"web": 0.5, "code": 0.3, "math": 0.2}
UP = {"web": 0.2, "code": 0.3, "math": 0.5}


def make_indexes(n=3000, seed=0, mus=(6.0, 7.0, 6.5)):
    rng = np.random.default_rng(seed)
    return [SimpleNamespace(sequence_log2=np.clip(np.round(rng.normal(mu, 1.3, n)), 5, 9).astype(np.int64),
                            max_log2=9) for mu in mus]


def decomposed(indexes, rank=0, world_size=2, total_steps=200, **kw):
    kw.setdefault("seed", 1)
    kw.setdefault("max_passes", 100.0)
    return S.from_decomposed(indexes, DomainUpsampling(BASE, UP, final_fraction=0.2), tokens_per_batch=4096,
                             curriculum="grow-p2", total_steps=total_steps, rank=rank, world_size=world_size, **kw)


def domain_of(rows, sizes):
    return np.searchsorted(np.cumsum(sizes), rows, side="right")


@pytest.fixture(scope="module")
def indexes():
    return make_indexes()


def test_decomposed_shapes_shares_and_lengths(indexes):
    T, W = 200, 2
    ranks = [list(decomposed(indexes, r, W, T)) for r in range(W)]
    logs = np.concatenate([ix.sequence_log2 for ix in indexes])
    sizes = [len(ix.sequence_log2) for ix in indexes]
    assert all(len(b) == T for b in ranks)
    tok = np.zeros((T, 3))
    ks = []
    for s in range(T):
        k = {int(v) for r in range(W) for v in np.unique(logs[ranks[r][s]])}
        assert len(k) == 1, f"step {s}: ranks mix buckets {k}"
        k = k.pop()
        ks.append(k)
        for r in range(W):
            assert len(ranks[r][s]) << k == 4096
            tok[s] += np.bincount(domain_of(ranks[r][s], sizes), minlength=3) << k
    assert len(set(ks)) >= 4, "a curriculum over several lengths"
    cut = 160
    before = tok[:cut].sum(0) / tok[:cut].sum()
    after = tok[cut:].sum(0) / tok[cut:].sum()
    np.testing.assert_allclose(before, list(BASE.values()), atol=0.01)
    np.testing.assert_allclose(after, list(UP.values()), atol=0.01)
    # grow-p2: short sequences come first within a phase
    assert np.mean(ks[:40]) < np.mean(ks[120:160])


def test_rank_split_is_even_and_sums_to_the_step(indexes):
    s0, s1 = decomposed(indexes, 0, 2), decomposed(indexes, 1, 2)
    steps = np.arange(s0.total_steps)
    c0, st0 = s0.rank_counts(steps, 0)
    c1, st1 = s1.rank_counts(steps, 1)
    counts = np.rint(s0.step_units() / np.exp2(s0.step_groups())[:, None]).astype(np.int64)  # all ranks
    np.testing.assert_array_equal(c0 + c1, counts)
    assert np.abs(c0 - c1).max() <= 1
    np.testing.assert_array_equal(st1, st0 + c0)  # rank 1 continues the stream where rank 0 stops
    # no domain is systematically favoured on one rank
    assert abs(int((c0 - c1).sum())) <= 0.01 * counts.sum()


def test_streams_read_each_row_once_per_pass(indexes):
    """Within a domain and bucket, rows repeat only after the stream has gone through all of them."""
    s = [decomposed(indexes, r, 2, 300, seed=5) for r in range(2)]
    logs = np.concatenate([ix.sequence_log2 for ix in indexes])
    batches = [b for step in zip(*(list(x) for x in s)) for b in step]  # stream order, batch by batch
    sizes = [len(ix.sequence_log2) for ix in indexes]
    owner = domain_of(np.arange(sum(sizes)), sizes)
    checked = 0
    for d in range(3):
        for k in range(5, 10):
            avail = int(((owner == d) & (logs == k)).sum())
            seen = []
            for b in batches:
                mine = b[(owner[b] == d) & (logs[b] == k)]
                if len(seen) + len(mine) > avail:
                    break
                seen.extend(mine.tolist())
            assert len(set(seen)) == len(seen), f"domain {d} bucket {k} repeats within a pass"
            checked += len(seen) == avail or len(seen) > avail // 2
    assert checked >= 5  # most streams were read through (a pass or most of one)


def test_domain_without_a_bucket_is_made_up_for(indexes):
    """math has no 2^9 sequences: its steps go to the others, and its share is caught up elsewhere."""
    ix = [SimpleNamespace(sequence_log2=i.sequence_log2.copy(), max_log2=9) for i in indexes]
    ix[2].sequence_log2[ix[2].sequence_log2 == 9] = 8
    s = S.from_decomposed(ix, Constant(BASE), tokens_per_batch=4096, total_steps=300, rank=0, world_size=1,
                          max_passes=100.0)
    logs = np.concatenate([i.sequence_log2 for i in ix])
    sizes = [len(i.sequence_log2) for i in ix]
    tok = np.zeros(3)
    nine = 0
    for b in s:
        k = int(logs[b[0]])
        d = domain_of(b, sizes)
        tok += np.bincount(d, minlength=3) << k
        if k == 9:
            nine += 1
            assert not (d == 2).any()
    assert nine > 0
    np.testing.assert_allclose(tok / tok.sum(), list(BASE.values()), atol=0.01)


def test_same_seed_same_order_other_seed_other_order(indexes):
    a = [b.copy() for b in decomposed(indexes, 1, 2, 50, seed=3)]
    b = [b.copy() for b in decomposed(indexes, 1, 2, 50, seed=3)]
    c = [b.copy() for b in decomposed(indexes, 1, 2, 50, seed=4)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a, c))


def test_resume_exactly(indexes):
    assert_sampler_resumes_exactly(lambda: decomposed(indexes, 1, 2, 60), epochs=1, steps=[0, 17, 60])


def test_state_refuses_another_configuration(indexes):
    s = decomposed(indexes, 0, 2, 60)
    it = iter(s)
    next(it)
    state = s.state_dict()
    with pytest.raises(ValueError, match="total_steps|plan_fingerprint|options"):
        decomposed(indexes, 0, 2, 61).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        decomposed(indexes, 0, 1, 60).load_state_dict(state)


def test_plan_warning_when_a_domain_is_read_too_often(indexes):
    with pytest.warns(PlanWarning, match="domain 'math' is read .* times"):
        S.from_decomposed(indexes, Constant({"web": 0.1, "code": 0.1, "math": 0.8}), tokens_per_batch=4096,
                          total_steps=400, rank=0, world_size=2, max_passes=2.0)
    with pytest.raises(ValueError, match="read .* times"):
        S.from_decomposed(indexes, Constant({"web": 0.1, "code": 0.1, "math": 0.8}), tokens_per_batch=4096,
                          total_steps=400, rank=0, world_size=2, max_passes=2.0, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanWarning)
        s = decomposed(indexes, 0, 2, 20, max_passes=4.0)
    assert max(s.stats()["passes"].values()) <= 4.0


def test_stats_count_units_and_passes(indexes):
    s = decomposed(indexes, 0, 2, 100)
    st = s.stats()
    assert sum(st["units"].values()) == 100 * 4096 * 2
    assert st["batches_per_rank"] == 100 and st["unit"] == "tokens"
    assert set(st["passes"]) == set(BASE) and all(p > 0 for p in st["passes"].values())
    assert sum(st["steps_per_group"].values()) == 100
    assert st["padding_fraction"] == 0.0  # sequence_tokens default to full 2^k


@pytest.mark.parametrize("bad, match", [
    ({"tokens_per_batch": 1000}, "multiple of 2\\^max_log2=512"),
    ({"total_steps": 0}, "total_steps must be an integer >= 1"),
    ({"cycles": 0}, "cycles must be an integer >= 1"),
])
def test_errors_name_the_parameter(indexes, bad, match):
    kw = {"tokens_per_batch": 4096, "total_steps": 10, **bad}
    with pytest.raises(ValueError, match=match):
        S.from_decomposed(indexes, Constant(BASE), world_size=1, rank=0, **kw)


def test_errors_on_groups_and_batch_sizes():
    sched = Constant({"a": 0.5, "b": 0.5})
    with pytest.raises(ValueError, match="one array per domain"):
        S([np.zeros(3, np.int64)], sched, batch_sizes={0: 1}, total_steps=2, world_size=1, rank=0)
    with pytest.raises(ValueError, match="batch_sizes has no entry for group"):
        S([np.zeros(3, np.int64), np.ones(3, np.int64)], sched, batch_sizes={0: 1}, total_steps=2, world_size=1,
          rank=0)
    with pytest.raises(ValueError, match="'b'.* no rows in a group with odds > 0"):
        S([np.zeros(3, np.int64), np.ones(3, np.int64)], sched, batch_sizes={0: 1, 1: 1}, group_odds={0: 1.0},
          total_steps=2, world_size=1, rank=0)


def test_duration_buckets_keep_the_padded_budget():
    rng = np.random.default_rng(0)
    durs = [rng.uniform(1, 20, 2000), rng.uniform(0.5, 8, 1500), np.append(rng.uniform(2, 30, 999), 99.0)]
    sched = Constant({"a": 0.5, "b": 0.2, "c": 0.3})
    W, T = 2, 150
    with pytest.warns(PlanWarning, match="drops 1 rows.*longer_than_max_duration"):
        ss = [S.from_durations(durs, sched, max_duration=60.0, num_buckets=6, total_steps=T, rank=r, world_size=W,
                               max_passes=100.0) for r in range(W)]
    allv = np.concatenate(durs)
    sizes = [len(d) for d in durs]
    secs = np.zeros(3)
    for b0, b1 in zip(*ss):
        assert len(b0) == len(b1)
        for b in (b0, b1):
            assert len(b) * allv[b].max() <= 60.0 * 1.0001 or len(b) == 1
            secs += np.bincount(domain_of(b, sizes), weights=allv[b], minlength=3)
    np.testing.assert_allclose(secs / secs.sum(), [0.5, 0.2, 0.3], atol=0.03)
    st = ss[0].stats()
    assert st["unit"] == "seconds" and st["dropped"] == {"longer_than_max_duration": 1}


def test_token_budget_buckets():
    rng = np.random.default_rng(1)
    lens = [rng.integers(1, 400, 1500), rng.integers(50, 900, 800)]
    sched = Linear({"a": 0.8, "b": 0.2}, {"a": 0.2, "b": 0.8})
    s = S.from_lengths(lens, sched, max_tokens=2048, num_buckets=4, total_steps=120, rank=0, world_size=1,
                       max_passes=100.0)
    allv = np.concatenate(lens)
    tok = np.zeros((120, 2))
    for i, b in enumerate(s):
        assert len(b) * allv[b].max() <= 2048
        tok[i] = np.bincount(domain_of(b, [1500, 800]), weights=allv[b], minlength=2)
    first, last = tok[:30].sum(0), tok[-30:].sum(0)
    assert first[0] / first.sum() > 0.6 and last[1] / last.sum() > 0.6


def test_random_kind_fixed_batches_in_rows():
    s = S.from_rows([100, 50], Constant({"a": 0.75, "b": 0.25}), batch_size=8, total_steps=40, rank=0,
                    world_size=1)
    got = np.concatenate(list(s))
    assert all(len(b) == 8 for b in s)
    assert (got >= 100).sum() == 80  # exactly a quarter of 320 rows
    assert s.stats()["unit"] == "rows"


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), W=st.integers(1, 3), T=st.integers(1, 40), D=st.integers(1, 3),
       k=st.integers(0, 40))
def test_any_config_same_shape_per_step_and_exact_resume(seed, W, T, D, k):
    rng = np.random.default_rng(seed)
    groups = [rng.integers(-1, 3, rng.integers(5, 60)) for _ in range(D)]
    for g in groups:
        g[0] = 0  # every domain has a row of group 0
    w = rng.dirichlet(np.ones(D))
    sched = Constant({f"d{i}": float(x) for i, x in enumerate(w / w.sum())})
    sizes = [rng.uniform(0.5, 4.0, len(g)) for g in groups]

    def make(r):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PlanWarning)
            return S(groups, sched, batch_sizes={0: 3, 1: 2, 2: 5}, sizes=sizes, total_steps=T, seed=seed, rank=r,
                     world_size=W)

    runs = [[b.copy() for b in make(r)] for r in range(W)]
    gall = np.concatenate(groups)
    for s in range(T):
        shape = {(len(runs[r][s]), tuple(np.unique(gall[runs[r][s]]))) for r in range(W)}
        assert len(shape) == 1 and len(next(iter(shape))[1]) == 1, f"step {s}: ranks differ {shape}"
    k = min(k, T)
    r = W - 1
    a = make(r)
    it = iter(a)
    for _ in range(k):
        next(it)
    b = make(r)
    b.load_state_dict(a.state_dict())
    rest = list(b)
    assert len(rest) == T - k and all(np.array_equal(x, y) for x, y in zip(rest, runs[r][k:]))
