"""samplers.DecomposedBatchSampler: exactly once per piece, one bucket per step, constant tokens, curriculum,
exact resume, errors. The index is the kernel's output (any object with the array attributes)."""

from __future__ import annotations

import json
import os
import types
import warnings

import numpy as np
import pytest
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from native.decompose import decompose_lengths
from samplers.base import PlanWarning
from samplers.decomposed import DecomposedBatchSampler
from tests.helpers import (
    assert_exactly_once,
    assert_sampler_resumes_exactly,
    run_ranks_with_queue,
)


def make_index(n=3000, lo_k=4, hi_k=9, remainder="pack", seed=0, sigma=1.2):
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, rng.lognormal(np.log(150), sigma, n).astype(np.int64))
    d = decompose_lengths(lengths, min_log2=lo_k, max_log2=hi_k, remainder=remainder)
    return types.SimpleNamespace(**d, min_log2=lo_k, max_log2=hi_k)


INDEX = make_index()
T = 4 << 9  # 4 sequences of the largest bucket per batch


def run_ranks(index, W, **kw):
    samplers = [DecomposedBatchSampler(index, rank=r, world_size=W, **kw) for r in range(W)]
    return samplers, [list(s) for s in samplers]


@pytest.mark.parametrize("W", [1, 2, 3])
@pytest.mark.parametrize("cycles", [1, 3])
def test_exactly_once_same_bucket_constant_tokens(W, cycles):
    samplers, per_rank = run_ranks(INDEX, W, tokens_per_batch=T, cycles=cycles, seed=4, drop_last=True)
    st_ = samplers[0].stats()
    assert_exactly_once(per_rank, len(INDEX.sequence_log2), dropped=st_["dropped"].get("incomplete_step", 0))
    # every piece exactly once, except the pieces of dropped sequences
    pieces = np.concatenate([np.arange(INDEX.sequence_offsets[s], INDEX.sequence_offsets[s + 1])
                             for b in per_rank for batch in b for s in batch])
    assert len(np.unique(pieces)) == len(pieces)
    log2 = INDEX.sequence_log2
    for step in range(len(per_rank[0])):
        ks = {int(k) for r in range(W) for k in np.unique(log2[per_rank[r][step]])}
        assert len(ks) == 1, f"step {step}: ranks took buckets {ks}"
        k = ks.pop()
        for r in range(W):
            assert len(per_rank[r][step]) << k == T
            assert per_rank[r][step].dtype == np.int64
    assert st_["steps"] == len(per_rank[0]) and st_["tokens_per_step"] == T * W


def test_dropped_sequences_are_counted_and_change_each_epoch():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PlanWarning: drop_last=True asks for these drops, as in every sampler
        s = DecomposedBatchSampler(INDEX, tokens_per_batch=T, world_size=2, rank=0, drop_last=True)
        st0 = s.stats()
    assert st0["dropped"]["incomplete_step"] > 0
    assert st0["rows"] + st0["dropped_rows"] == len(INDEX.sequence_log2)
    seen0 = set(s.global_plan().indices.tolist())
    s.set_epoch(1)
    seen1 = set(s.global_plan().indices.tolist())
    assert seen0 != seen1  # the bucket's shuffle decides which sequences miss the last step


def test_default_drops_incomplete_steps_and_says_so():
    """The default keeps the sampler's contract (each sequence at most once, constant tokens per step): the
    sequences of an incomplete step are left out, counted, and announced with the two ways to choose."""
    with pytest.warns(PlanWarning, match=r"incomplete_step .*drop_last=False .*drop_last=True"):
        s = DecomposedBatchSampler(INDEX, tokens_per_batch=T, world_size=2, rank=0)
    assert s.stats()["dropped"]["incomplete_step"] > 0 and not s.stats()["repeated"]


def test_drop_last_false_keeps_every_sequence_repeats_reported_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PlanWarning: the repeats are what drop_last=False asks for
        samplers, per_rank = run_ranks(INDEX, 2, tokens_per_batch=T, drop_last=False)
    allseq = np.concatenate([np.concatenate(b) for b in per_rank])
    assert set(allseq.tolist()) == set(range(len(INDEX.sequence_log2)))
    st_ = samplers[0].stats()
    assert st_["repeated"]["incomplete_step"] == len(allseq) - len(INDEX.sequence_log2)
    assert not st_["dropped"]


@settings(max_examples=25, deadline=None)
@given(W=st.integers(1, 4), seed=st.integers(0, 2**31), cycles=st.integers(1, 3), epoch=st.integers(0, 3),
       curriculum=st.sampled_from(["grow-p2", "grow-linear", "uniform"]))
def test_property_exactly_once_and_same_shape(W, seed, cycles, epoch, curriculum):
    samplers = [DecomposedBatchSampler(INDEX, tokens_per_batch=T, rank=r, world_size=W, cycles=cycles, seed=seed,
                                       curriculum=curriculum, drop_last=True) for r in range(W)]
    for s in samplers:
        s.set_epoch(epoch)
    per_rank = [list(s) for s in samplers]
    assert_exactly_once(per_rank, len(INDEX.sequence_log2),
                        dropped=samplers[0].stats()["dropped"].get("incomplete_step", 0))
    shapes = [[len(b) for b in batches] for batches in per_rank]
    assert all(sh == shapes[0] for sh in shapes)
    again = [list(DecomposedBatchSampler(INDEX, tokens_per_batch=T, rank=0, world_size=W, cycles=cycles,
                                         seed=seed, curriculum=curriculum, drop_last=True)) for _ in range(1)]
    if epoch == 0:
        assert all(np.array_equal(a, b) for a, b in zip(again[0], per_rank[0]))


@pytest.mark.parametrize("incomplete, drop_last", [("drop", True), ("repeat", False)])
def test_incomplete_is_deprecated_and_means_drop_last(incomplete, drop_last):
    with pytest.warns(DeprecationWarning, match=f"incomplete='{incomplete}'.*pass drop_last={drop_last}"):
        old = DecomposedBatchSampler(INDEX, tokens_per_batch=T, world_size=2, rank=1, seed=5, incomplete=incomplete)
    new = DecomposedBatchSampler(INDEX, tokens_per_batch=T, world_size=2, rank=1, seed=5, drop_last=drop_last)
    assert all(np.array_equal(a, b) for a, b in zip(old, new, strict=True))
    assert old.state_dict()["options"] == new.state_dict()["options"]  # checkpoints of either spelling load


def _cycle_steps(s):
    st_ = s.stats()
    k = np.asarray(st_["step_log2"])
    return k, st_


def test_grow_p2_gives_short_buckets_first_within_each_cycle():
    idx = make_index(n=20000, sigma=1.0)
    for cycles in (1, 2):
        s = DecomposedBatchSampler(idx, tokens_per_batch=T, curriculum="grow-p2", cycles=cycles, seed=1)
        k, st_ = _cycle_steps(s)
        per_cycle = np.array_split(k, cycles)  # cycles hold near-equal slices of every bucket
        for ks in per_cycle:
            q = len(ks) // 4
            assert ks[:q].mean() < ks[-q:].mean() - 0.5, (ks[:q].mean(), ks[-q:].mean())
            # the long buckets mostly come late: median position of the largest bucket is in the second half
            pos = np.flatnonzero(ks == ks.max())
            assert np.median(pos) > len(ks) / 2
        u = DecomposedBatchSampler(idx, tokens_per_batch=T, curriculum="uniform", seed=1)
        ku, _ = _cycle_steps(u)
        q = len(ku) // 4
        assert abs(ku[:q].mean() - ku[-q:].mean()) < 0.5  # no trend without a curriculum


def test_custom_odds_and_zero_odds_bucket():
    s = DecomposedBatchSampler(INDEX, tokens_per_batch=T, curriculum={4: 1, 5: 1, 6: 1, 7: 1, 8: 1, 9: 0})
    st_ = s.stats()
    assert st_["dropped"]["zero_odds"] == int((INDEX.sequence_log2 == 9).sum())
    assert 9 not in set(st_["step_log2"])
    assert st_["curriculum"].startswith("custom:")


@pytest.mark.parametrize("cycles,W", [(1, 1), (2, 2)])
def test_resumes_exactly_mid_cycle_and_across_cycles_and_epochs(cycles, W):
    idx = make_index(n=600)

    def make():
        return DecomposedBatchSampler(idx, tokens_per_batch=T, cycles=cycles, seed=9, rank=W - 1, world_size=W)

    n = len(make())
    assert n > 6
    assert_sampler_resumes_exactly(make, epochs=2, steps=sorted({0, 1, n // cycles - 1, n // cycles, n // 2 + 1,
                                                                 n - 1, n}))


def test_state_is_small_and_checked():
    s = DecomposedBatchSampler(INDEX, tokens_per_batch=T, cycles=2)
    state = s.state_dict()
    assert len(json.dumps(state)) < 2048
    other = DecomposedBatchSampler(INDEX, tokens_per_batch=2 * T, cycles=2)
    with pytest.raises(ValueError, match="tokens_per_batch"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="unknown keys"):
        s.load_state_dict({**state, "extra": 1})


def test_stats_tokens_and_attention_cost():
    s = DecomposedBatchSampler(INDEX, tokens_per_batch=T)
    st_ = s.stats()
    plan = s.global_plan()
    assert sum(st_["tokens_per_bucket"].values()) == st_["tokens"] == int(INDEX.sequence_tokens[plan.indices].sum())
    assert len(st_["attention_cost_per_step"]) == st_["steps"]
    # bucket steps: sum over L^2 of the step's document segments, never more than 2^k * tokens per step
    k = np.asarray(st_["step_log2"])
    assert (np.asarray(st_["attention_cost_per_step"]) <= (T * np.exp2(k)) + 1e-6).all()
    assert 0 < st_["attention_cost_vs_concat_chunk"] < 1
    assert st_["buckets"][9]["batch_size"] == 4 and st_["buckets"][4]["batch_size"] == 128


@pytest.mark.parametrize("kw,exc,match", [
    (dict(tokens_per_batch=1000), ValueError, r"multiple of 2\^max_log2=512"),
    (dict(tokens_per_batch=256), ValueError, "multiple of"),
    (dict(tokens_per_batch=T, cycles=0), ValueError, "cycles must be"),
    (dict(tokens_per_batch=T, curriculum="shrink"), ValueError, "curriculum must be one of"),
    (dict(tokens_per_batch=T, curriculum={12: 1.0}), ValueError, "empty bucket"),
    (dict(tokens_per_batch=T, curriculum={4: -1.0}), ValueError, "odds must be finite and >= 0"),
    (dict(tokens_per_batch=T, incomplete="pad"), ValueError, "incomplete must be"),
    (dict(tokens_per_batch=T * 1000, drop_last=True), ValueError, "no bucket fills one step"),
    (dict(tokens_per_batch=T, drop_last="no"), TypeError, "drop_last must be True, False or None"),
])
def test_bad_input(kw, exc, match):
    with pytest.raises(exc, match=match):
        DecomposedBatchSampler(INDEX, **kw)


def test_bad_index():
    with pytest.raises(TypeError, match="sequence_log2"):
        DecomposedBatchSampler(object(), tokens_per_batch=T)
    empty = types.SimpleNamespace(sequence_log2=np.zeros(0, np.int64), max_log2=9)
    with pytest.raises(ValueError, match="no sequences"):
        DecomposedBatchSampler(empty, tokens_per_batch=T)


# ---- a real gloo group: ranks from torch.distributed agree on the bucket of every step -----------------------------
def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # rank and world size from torch.distributed
        s = DecomposedBatchSampler(INDEX, tokens_per_batch=T, cycles=2, seed=3, drop_last=True)
        ks = [int(INDEX.sequence_log2[b[0]]) for b in s]
        gathered = [None] * world
        dist.all_gather_object(gathered, (s.rank, s.world_size, ks, [b.tolist() for b in s]))
        if rank == 0:
            out.put(gathered)
    finally:
        dist.destroy_process_group()


def test_gloo_ranks_agree():
    gathered = run_ranks_with_queue(_worker, 2)
    (r0, w0, ks0, b0), (r1, w1, ks1, b1) = gathered
    assert (r0, r1, w0, w1) == (0, 1, 2, 2)
    assert ks0 == ks1 and len(b0) == len(b1)
    assert not set(np.concatenate(b0).tolist()) & set(np.concatenate(b1).tolist())
