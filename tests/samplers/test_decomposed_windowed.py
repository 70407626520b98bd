"""DecomposedBatchSampler's windowed plan (above EXACT_MAX_SEQUENCES; the threshold is lowered here): the exact
plan's invariants (one bucket per step on every rank, constant tokens, each sequence at most once, incomplete steps
counted), the exact plan's bucket schedule, exact resume (also in a fresh process over a memory-mapped index, from
the on-disk counting pass), elastic resume 2 -> 3 ranks, and stats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import samplers.decomposed as sd
from samplers.base import PlanStats
from samplers.decomposed import DecomposedBatchSampler
from samplers.plan_cache import StalePlanCache
from tests.helpers import assert_exactly_once, assert_sampler_resumes_exactly
from tests.samplers.test_decomposed import make_index

T = 4 << 9
BIG = make_index(n=28000, seed=5)  # ~1e5 sequences
SMALL = make_index(n=2000, seed=6)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def windowed(monkeypatch):
    """Every sampler built in the test plans windowed, with small chunks (many chunk boundaries)."""
    monkeypatch.setattr(sd, "EXACT_MAX_SEQUENCES", 0)
    monkeypatch.setattr(sd, "CHUNK_SEQUENCES", 1000)


def ranks(index, W, **kw):
    samplers = [DecomposedBatchSampler(index, rank=r, world_size=W, **kw) for r in range(W)]
    return samplers, [list(s) for s in samplers]


def assert_one_bucket_constant_tokens(index, per_rank, tokens):
    log2 = np.asarray(index.sequence_log2)
    for step in range(len(per_rank[0])):
        ks = {int(k) for batches in per_rank for k in np.unique(log2[batches[step]])}
        assert len(ks) == 1, f"step {step}: ranks took buckets {ks}"
        k = ks.pop()
        assert all(len(batches[step]) << k == tokens for batches in per_rank), f"step {step}"


@pytest.mark.parametrize("index,W,cycles", [(BIG, 3, 2), (SMALL, 1, 1)])
def test_exactly_once_one_bucket_per_step_constant_tokens(windowed, index, W, cycles):
    samplers, per_rank = ranks(index, W, tokens_per_batch=T, cycles=cycles, seed=4, drop_last=True)
    assert samplers[0].windowed
    st_ = samplers[0].stats()
    dropped = st_["dropped"].get("incomplete_step", 0)
    assert dropped > 0
    assert_exactly_once(per_rank, len(index.sequence_log2), dropped=dropped)
    assert_one_bucket_constant_tokens(index, per_rank, T)
    assert st_["steps"] == len(per_rank[0]) == len(samplers[0])
    assert st_["rows"] + st_["dropped_rows"] == len(index.sequence_log2)
    assert all(b.dtype == np.int64 for b in per_rank[0])


@pytest.mark.parametrize("drop_last", [True, False])
def test_same_bucket_schedule_and_counts_as_the_exact_plan(monkeypatch, drop_last):
    kw = dict(tokens_per_batch=T, cycles=2, seed=7, world_size=2, rank=1, drop_last=drop_last)
    exact = DecomposedBatchSampler(SMALL, **kw)
    monkeypatch.setattr(sd, "EXACT_MAX_SEQUENCES", 0)
    win = DecomposedBatchSampler(SMALL, **kw)
    assert not exact.windowed and win.windowed
    for epoch in (0, 1):
        exact.set_epoch(epoch), win.set_epoch(epoch)
        a, b = exact.stats(), win.stats()
        assert a["step_log2"] == b["step_log2"]  # the curriculum: same bucket at every step
        for key in ("num_batches", "rows", "dropped", "repeated", "min_batch_size", "max_batch_size", "steps"):
            assert a[key] == b[key], key
        assert {k: v["steps"] for k, v in a["buckets"].items()} == {k: v["steps"] for k, v in b["buckets"].items()}
        assert [len(x) for x in exact] == [len(x) for x in win]
    # same buckets, other sequences: the bucket's order is another permutation
    assert not all(np.array_equal(x, y) for x, y in zip(exact, win))


def test_repeat_keeps_every_sequence(windowed):
    samplers, per_rank = ranks(SMALL, 2, tokens_per_batch=T, seed=2, drop_last=False)
    allseq = np.concatenate([np.concatenate(b) for b in per_rank])
    assert set(allseq.tolist()) == set(range(len(SMALL.sequence_log2)))
    st_ = samplers[0].stats()
    assert st_["repeated"]["incomplete_step"] == len(allseq) - len(SMALL.sequence_log2)
    assert not st_["dropped"]
    assert_one_bucket_constant_tokens(SMALL, per_rank, T)


def mates_again(e0, e1, n):
    """Mean share of a sequence's epoch-0 batch-mates (itself excluded) that are again its batch-mates in epoch 1."""
    bid1 = np.full(n, -1)
    bid1[e1.indices] = np.repeat(np.arange(e1.num_batches), e1.sizes)
    out = []
    for b in range(0, e0.num_batches, 3):
        rows = e0.indices[e0.offsets[b]:e0.offsets[b + 1]]
        if bid1[rows[0]] >= 0:
            out.append(np.mean(bid1[rows[1:]] == bid1[rows[0]]))
    return float(np.mean(out))


def test_each_epoch_shuffles_buckets_anew_as_the_exact_plan_does(monkeypatch):
    def epochs():
        s = DecomposedBatchSampler(BIG, tokens_per_batch=T, seed=3, drop_last=True)
        e0 = s.global_plan()
        s.set_epoch(1)
        return e0, s.global_plan()

    exact = mates_again(*epochs(), len(BIG.sequence_log2))
    monkeypatch.setattr(sd, "EXACT_MAX_SEQUENCES", 0)
    e0, e1 = epochs()
    assert set(e0.indices.tolist()) != set(e1.indices.tolist())  # other sequences miss the last steps
    win = mates_again(e0, e1, len(BIG.sequence_log2))
    assert win < 0.05 and abs(win - exact) < 0.01, (win, exact)  # batch-mates change as much as before
    b = e0.indices[e0.offsets[0]:e0.offsets[1]]
    assert not np.array_equal(np.sort(b), b)  # a batch is not a run of consecutive sequences of its bucket


@pytest.mark.parametrize("cycles,W", [(2, 2)])
def test_resumes_exactly_mid_cycle_and_across_epochs(windowed, cycles, W):
    def make():
        return DecomposedBatchSampler(SMALL, tokens_per_batch=T, cycles=cycles, seed=9, rank=W - 1, world_size=W)

    n = len(make())
    assert n > 10
    assert_sampler_resumes_exactly(make, epochs=2, steps=sorted({0, 1, n // 2, n // 2 + 1, n - 1, n}))


def test_elastic_resume_two_to_three_ranks_matches_the_exact_arrangement(monkeypatch):
    kw = dict(tokens_per_batch=T, cycles=2, seed=11, drop_last=True)
    k = 40

    def run(windowed):
        if windowed:
            monkeypatch.setattr(sd, "EXACT_MAX_SEQUENCES", 0)
        else:
            monkeypatch.setattr(sd, "EXACT_MAX_SEQUENCES", 1 << 22)
        old = [DecomposedBatchSampler(SMALL, rank=r, world_size=2, **kw) for r in range(2)]
        seen = []
        for s in old:
            it = iter(s)
            seen += [next(it) for _ in range(k)]
        state = old[0].state_dict()
        new = [DecomposedBatchSampler(SMALL, rank=r, world_size=3, **kw) for r in range(3)]
        for s in new:
            s.load_state_dict(state)
        rest = [list(s) for s in new]
        return seen, rest, new[0].stats()

    _, rest_e, st_e = run(False)
    seen_w, rest_w, st_w = run(True)
    assert st_w["step_log2"] == st_e["step_log2"]  # the rest of the curriculum keeps its course
    assert st_w["dropped"] == st_e["dropped"] and "uneven_tail" in st_w["dropped"]
    assert [len(b) for b in rest_w[0]] == [len(b) for b in rest_e[0]]
    assert_one_bucket_constant_tokens(SMALL, rest_w, T)
    allrows = np.concatenate(seen_w + [b for r in rest_w for b in r])
    assert len(np.unique(allrows)) == len(allrows)  # nothing twice across the resize
    assert sum(len(b) for r in rest_w for b in r) == st_w["rows"]  # stats describe the rest of the epoch


def test_fresh_process_resume_from_a_memory_map_uses_the_disk_cache(tmp_path):
    np.save(tmp_path / "log2.npy", np.asarray(BIG.sequence_log2, dtype=np.int8))
    env = {**os.environ, "DATAPIPE_PLAN_CACHE": str(tmp_path / "cache"), "PYTHONPATH": ROOT}
    code = """
import json, sys, types, warnings
import numpy as np
import samplers.decomposed as sd
warnings.simplefilter("ignore")
sd.EXACT_MAX_SEQUENCES = 0
idx = types.SimpleNamespace(sequence_log2=np.load(sys.argv[1], mmap_mode="r"), max_log2=9)
s = sd.DecomposedBatchSampler(idx, tokens_per_batch=TOKENS, cycles=2, seed=5, rank=1, world_size=2)
if sys.argv[2] == "save":
    it = iter(s)
    for _ in range(30):
        next(it)
    state = s.state_dict()
    out = {"state": state, "want": next(it).tolist(), "cached": s._counts_cached}
else:
    s.load_state_dict(json.loads(open(sys.argv[2]).read())["state"])
    out = {"got": next(iter(s)).tolist(), "cached": s._counts_cached}
print(json.dumps(out))
""".replace("TOKENS", str(T))
    run = [sys.executable, "-c", code, str(tmp_path / "log2.npy")]
    first = json.loads(subprocess.run(run + ["save"], env=env, capture_output=True, text=True, check=True,
                                      cwd=ROOT).stdout)
    assert not first["cached"] and list((tmp_path / "cache").glob("decomposed_counts-*.npz"))
    (tmp_path / "state.json").write_text(json.dumps(first))
    second = json.loads(subprocess.run(run + [str(tmp_path / "state.json")], env=env, capture_output=True,
                                       text=True, check=True, cwd=ROOT).stdout)
    assert second["cached"]  # the counting pass came from disk
    assert second["got"] == first["want"]


def test_damaged_disk_cache_is_an_error_naming_it(windowed, tmp_path, monkeypatch):
    monkeypatch.setenv("DATAPIPE_PLAN_CACHE", str(tmp_path / "cache"))
    log2 = np.asarray(SMALL.sequence_log2, dtype=np.int8)
    np.save(tmp_path / "log2.npy", log2)
    idx = types.SimpleNamespace(sequence_log2=np.load(tmp_path / "log2.npy", mmap_mode="r"), max_log2=9)
    DecomposedBatchSampler(idx, tokens_per_batch=T)
    (path,) = (tmp_path / "cache").glob("decomposed_counts-*.npz")
    with np.load(path) as z:
        parts = dict(z)
    parts["counts"] = np.roll(parts["counts"], 1, axis=0)  # counts of the wrong chunks
    np.savez(path, **parts)
    sd._COUNTS._mem.clear()
    s = DecomposedBatchSampler(idx, tokens_per_batch=T)
    with pytest.raises(StalePlanCache, match="damaged cache entry"):
        list(s)
    assert not path.exists()


def test_stats_are_json_and_have_the_shared_keys(windowed):
    s = DecomposedBatchSampler(SMALL, tokens_per_batch=T, world_size=2, rank=0)
    st_ = s.stats()
    json.dumps(st_)
    assert set(PlanStats.__annotations__) <= set(st_)
    assert st_["plan"] == "windowed"
    plan = s.global_plan()
    assert st_["rows"] == len(plan.indices) and st_["num_batches"] == plan.num_batches
    assert st_["tokens"] == int((np.left_shift(1, SMALL.sequence_log2[plan.indices])).sum())
    assert sum(v["sequences"] for v in st_["buckets"].values()) == st_["rows"]


def test_states_do_not_cross_between_exact_and_windowed(monkeypatch):
    state = DecomposedBatchSampler(SMALL, tokens_per_batch=T).state_dict()
    monkeypatch.setattr(sd, "EXACT_MAX_SEQUENCES", 0)
    with pytest.raises(ValueError, match="plan="):
        DecomposedBatchSampler(SMALL, tokens_per_batch=T).load_state_dict(state)


def test_out_of_range_bucket_names_the_row(windowed):
    log2 = np.asarray(SMALL.sequence_log2, dtype=np.int16).copy()
    log2[1234] = 70
    with pytest.raises(ValueError, match=r"row 1234 has 70"):
        DecomposedBatchSampler(types.SimpleNamespace(sequence_log2=log2), tokens_per_batch=T)


@pytest.mark.slow
def test_default_threshold_memory_mapped_index_of_5e6_sequences(tmp_path):
    """Above the real EXACT_MAX_SEQUENCES, with the real chunk size: a memory-mapped int8 index is read in place,
    every rank's step has one bucket and constant tokens, and a resume after 50 batches gives the 51st."""
    n = 5_000_000
    assert n > sd.EXACT_MAX_SEQUENCES
    rng = np.random.default_rng(0)
    mm = np.lib.format.open_memmap(tmp_path / "log2.npy", mode="w+", dtype=np.int8, shape=(n,))
    mm[:] = rng.choice(np.arange(8, 14, dtype=np.int8), n, p=[0.4, 0.24, 0.15, 0.1, 0.07, 0.04])
    mm.flush()
    del mm
    idx = types.SimpleNamespace(sequence_log2=np.load(tmp_path / "log2.npy", mmap_mode="r"), max_log2=13)
    kw = dict(tokens_per_batch=1 << 17, cycles=2, seed=1, world_size=4)
    samplers = [DecomposedBatchSampler(idx, rank=r, **kw) for r in range(4)]
    assert samplers[0].windowed and np.shares_memory(samplers[0].sequence_log2, idx.sequence_log2)  # not copied
    its = [iter(s) for s in samplers]
    per_rank = [[next(it) for _ in range(50)] for it in its]
    assert_one_bucket_constant_tokens(idx, per_rank, 1 << 17)
    allrows = np.concatenate([b for r in per_rank for b in r])
    assert len(np.unique(allrows)) == len(allrows)
    state, want = samplers[2].state_dict(), next(its[2])
    again = DecomposedBatchSampler(idx, rank=2, **kw)
    again.load_state_dict(state)
    np.testing.assert_array_equal(next(iter(again)), want)
