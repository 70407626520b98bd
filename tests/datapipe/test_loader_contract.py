"""The sampler contract honoured end to end through ``datapipe.DataLoader`` (issue 11): epoch hooks, epochs of
unequal length, nested and guarded state, ``in_order=False``, ``batch_size=None``, iterable datasets, elastic
resume (also over a real 2 -> 3 rank gloo run)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.utils.data as tud

import datapipe
import samplers
from tests.helpers import assert_loader_resumes_exactly, elastic_resume, run_ranks_with_queue

pytestmark = pytest.mark.filterwarnings("ignore::samplers.PlanWarning")


class Rows(tud.Dataset):
    """Each row is its own index (as a tensor): batches show exactly which rows were delivered."""

    def __init__(self, n: int, slow: tuple[int, ...] = ()):
        self.n, self.slow = n, set(slow)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        assert type(i) is int, f"__getitem__ got {type(i).__name__}, torch passes int"
        if i in self.slow:
            time.sleep(0.3)
        return torch.tensor(i)


def rows_of(batches) -> list[int]:
    out = []
    for b in batches:
        out.extend(torch.as_tensor(b).reshape(-1).tolist())
    return out


def durations(n=600, seed=0):
    return np.random.default_rng(seed).lognormal(1.0, 0.6, n).clip(0.3, 30)


# ---- epoch hooks: NGAME refreshes through the loader --------------------------------------------------------
def test_ngame_refreshes_through_the_loader_and_batches_get_hard():
    rng = np.random.default_rng(0)
    groups, per, d = 60, 10, 16
    centers = rng.normal(size=(groups, d)) * 4
    group = np.repeat(np.arange(groups), per)
    emb = (centers[group] + rng.normal(size=(groups * per, d))).astype(np.float32)
    n, B = len(group), 20
    sampler = samplers.NGAMEBatchSampler(n, batch_size=B, cluster_size=5, warmup_epochs=1, refresh_every=1, seed=0)
    loader = datapipe.DataLoader(Rows(n), batch_sampler=sampler)

    def recall(batches):
        hits = total = 0
        for b in batches:
            g = group[b]
            hits += sum(int((g == x).sum()) - 1 for x in g)
            total += len(b) * (per - 1)
        return hits / total

    recalls = []
    for _ in range(3):
        seen = []
        for batch in loader:
            rows = batch.numpy()
            seen.append(rows)
            sampler.update_embeddings(rows, emb[rows])  # the model's embeddings of this batch
        recalls.append(recall(seen))
        assert sorted(np.concatenate(seen).tolist()) == list(range(n))  # every row once per epoch
    random_recall = (B - 1) / (n - 1)
    assert sampler.stats()["refreshes"] >= 1
    assert recalls[0] < 3 * random_recall  # warm-up epoch: random batches
    assert recalls[2] > 8 * random_recall, recalls


# ---- epochs of unequal length --------------------------------------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_duration_buckets_resume_across_unequal_epochs(num_workers):
    d = durations()

    def make():
        s = samplers.DurationBucketSampler(d, max_duration=40.0, num_buckets=8, seed=3)
        return datapipe.DataLoader(Rows(len(d)), batch_sampler=s, num_workers=num_workers)

    ref = make()
    lens = []
    for _ in range(3):
        lens.append(len(ref))
        assert len(list(ref)) == lens[-1]  # len() describes the epoch the next iter() runs
    assert len(set(lens)) > 1, f"want epochs of unequal batch counts for this test, got {lens}"
    ends = np.cumsum(lens).tolist()
    steps = sorted({0, 1, lens[0] - 1, *ends[:2], ends[0] + 1, ends[1] - 1, ends[1] + 1})
    if num_workers:
        steps = [0, ends[0], ends[0] + 2, ends[1]]
    assert_loader_resumes_exactly(make, epochs=3, steps=steps)


@pytest.mark.parametrize("make_sampler", [
    lambda n: samplers.RandomBatchSampler(n, 7, seed=1),
    lambda n: samplers.TokenBudgetBatchSampler(np.arange(n) % 37 + 1, max_tokens=120, seed=2),
    lambda n: samplers.PackedDurationSampler(durations(n), max_duration=20.0, seed=2),
    lambda n: samplers.TopicAwareBatchSampler(np.arange(n) % 9, batch_size=8, clusters_per_batch=2, seed=4),
    lambda n: samplers.MixtureBatchSampler.from_domains(
        np.array(["a", "b"])[np.arange(n) % 2], _schedule(), batch_size=6, total_steps=15, seed=1),
], ids=["random", "token_budget", "packed", "topic_aware", "mixture"])
def test_every_sampler_resumes_through_the_loader(make_sampler):
    n = 150
    assert_loader_resumes_exactly(lambda: datapipe.DataLoader(Rows(n), batch_sampler=make_sampler(n)),
                                  steps=[0, 1, 5, 14, 15, 16, 29])


def _schedule():
    from mixtures.schedules import Constant

    return Constant({"a": 0.7, "b": 0.3})


def test_decomposed_sampler_resumes_through_the_loader():
    from tests.samplers.test_decomposed import make_index

    idx = make_index(n=3000, sigma=1.0)

    def make():
        s = samplers.DecomposedBatchSampler(idx, tokens_per_batch=1 << 10, seed=5)
        return datapipe.DataLoader(Rows(len(idx.sequence_log2)), batch_sampler=s)

    n = len(make())
    assert_loader_resumes_exactly(make, steps=[0, 1, n // 2, n - 1, n, n + 3])


# ---- the checkpoint is guarded ----------------------------------------------------------------------------
def test_state_refuses_another_configuration():
    lengths = np.arange(300) % 50 + 1

    def make(lengths=lengths, **kw):
        opts = {"max_tokens": 256, "seed": 1, **kw}
        return datapipe.DataLoader(Rows(len(lengths)), batch_sampler=samplers.TokenBudgetBatchSampler(lengths, **opts))

    a = make()
    it = iter(a)
    next(it), next(it)
    state = a.state_dict()
    assert state["sampler_state"]["batches_yielded"] == 2  # delivered, not what the sampler handed out
    with pytest.raises(ValueError, match="max_tokens"):
        make(max_tokens=512).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        make(seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="metadata"):
        make(lengths=lengths[::-1].copy()).load_state_dict(state)
    with pytest.raises(ValueError, match="sort_window"):
        make(sort_window=8).load_state_dict(state)
    with pytest.raises(ValueError, match="order|sampler"):
        datapipe.DataLoader(Rows(300), batch_size=4).load_state_dict(state)
    b = make()
    b.load_state_dict(state)
    assert b.state_dict() == state


def test_drop_in_loader_state_refuses_another_seed_or_dataset():
    a = datapipe.DataLoader(Rows(50), batch_size=4, shuffle=True, seed=1)
    next(iter(a))
    state = a.state_dict()
    with pytest.raises(ValueError, match="seed"):
        datapipe.DataLoader(Rows(50), batch_size=4, shuffle=True, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="rows"):
        datapipe.DataLoader(Rows(51), batch_size=4, shuffle=True, seed=1).load_state_dict(state)


# ---- resume in every delivery mode ---------------------------------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_batch_size_none_shuffle_seed_resumes_exactly(num_workers):
    n = 40

    def make():
        return datapipe.DataLoader(Rows(n), batch_size=None, shuffle=True, seed=5, num_workers=num_workers)

    ref = [int(x) for x in make()]
    assert sorted(ref) == list(range(n)) and ref != list(range(n))
    for k in (0, 1, 13, n - 1, n):
        a = make()
        it = iter(a)
        got = [int(next(it)) for _ in range(k)]
        state = a.state_dict()
        del it
        b = make()
        b.load_state_dict(state)
        rest = [int(x) for x in b] if k < n else [int(x) for x in b][:0]
        assert got + rest == ref, k


def test_in_order_false_resume_delivers_every_batch_once():
    n, bs = 48, 4
    slow = (0, 1, 2, 3)  # the first batch is slow: later batches overtake it

    def make():
        return datapipe.DataLoader(Rows(n, slow), batch_size=bs, shuffle=True, seed=7, num_workers=2,
                                   in_order=False)

    a = make()
    first = []
    for b in a:
        first.append(b.tolist())
        if len(first) == 4:
            break
    state = a.state_dict()
    del a
    b = make()
    b.load_state_dict(state)
    rest = [x.tolist() for x in b]
    delivered = [r for batch in first + rest for r in batch]
    assert sorted(delivered) == list(range(n)), "a batch was skipped or repeated across the resume"
    assert len(first) + len(rest) == n // bs


class Stream(tud.IterableDataset):
    def __iter__(self):
        info = tud.get_worker_info()
        w, k = (0, 1) if info is None else (info.id, info.num_workers)
        return iter(torch.arange(40)[w::k].split(1))


def test_iterable_resume_with_another_worker_count_is_refused():
    a = datapipe.DataLoader(Stream(), batch_size=4, num_workers=2)
    it = iter(a)
    next(it), next(it)
    state = a.state_dict()
    del it
    with pytest.raises(ValueError, match="num_workers"):
        datapipe.DataLoader(Stream(), batch_size=4, num_workers=0).load_state_dict(state)
    b = datapipe.DataLoader(Stream(), batch_size=4, num_workers=2)
    b.load_state_dict(state)
    assert len(rows_of(b)) == 40 - 8


def test_user_set_epoch_on_a_datapipe_sampler_wins():
    s = samplers.RandomBatchSampler(30, 4, seed=1)
    loader = datapipe.DataLoader(Rows(30), batch_sampler=s)
    s.set_epoch(4)
    got = rows_of(loader)
    ref = samplers.RandomBatchSampler(30, 4, seed=1)
    ref.set_epoch(4)
    assert got == np.concatenate(list(ref)).tolist() and loader.epoch == 5


# ---- elastic resume --------------------------------------------------------------------------------------------
ELASTIC = {
    "random": lambda r, w: samplers.RandomBatchSampler(203, 6, seed=3, rank=r, world_size=w),
    "token_budget": lambda r, w: samplers.TokenBudgetBatchSampler(np.arange(203) % 41 + 1, max_tokens=160,
                                                                  seed=3, rank=r, world_size=w),
    "duration": lambda r, w: samplers.DurationBucketSampler(durations(203), max_duration=30.0, num_buckets=8,
                                                            seed=3, rank=r, world_size=w),
    "packed": lambda r, w: samplers.PackedDurationSampler(durations(203), max_duration=25.0, seed=3, rank=r,
                                                          world_size=w),
    "topic_aware": lambda r, w: samplers.TopicAwareBatchSampler(np.arange(203) % 7, batch_size=6, seed=3, rank=r,
                                                                world_size=w),
    "decomposed": lambda r, w: samplers.DecomposedBatchSampler(_index(), tokens_per_batch=64, seed=3, rank=r,
                                                               world_size=w, drop_last=True),  # no repeats
}


def _index():
    from types import SimpleNamespace

    log2 = np.random.default_rng(1).integers(2, 5, 203)
    return SimpleNamespace(sequence_log2=log2, max_log2=4)


@pytest.mark.parametrize("old,new", [(2, 3), (4, 2), (3, 3), (2, 5)])
@pytest.mark.parametrize("name", sorted(ELASTIC))
def test_elastic_resume_delivers_the_rest_exactly_once(name, old, new):
    make = ELASTIC[name]
    olds, news, consumed, rest = elastic_resume(make, old, new)
    assert len({len(r) for r in rest}) == 1, "new ranks yield different batch counts"
    seen = np.concatenate(consumed + [b for r in rest for b in r])
    dropped = olds[0].stats()["dropped_rows"] + news[0].stats()["dropped_rows"]
    assert len(np.unique(seen)) == len(seen), "a row was delivered twice"
    assert len(seen) + dropped >= 203 - olds[0].stats()["dropped_rows"]
    if name == "duration":  # same-shape steps: every new rank's batch at a step comes from one bucket
        bucket = news[0].bucket_of
        for step in zip(*rest):
            assert len({int(bucket[b[0]]) for b in step}) == 1
    if name == "decomposed":  # one 2^k bucket per step on every rank, constant tokens per batch
        log2 = _index().sequence_log2
        for step in zip(*rest):
            ks = {int(log2[b[0]]) for b in step}
            assert len(ks) == 1 and all(len(b) << ks.pop() == 64 for b in step[:1])
    # a checkpoint of the elastic epoch resumes again (at the new size)
    again = make(0, new)
    k = len(olds[0]) // 3  # the batches each old rank delivered (elastic_resume's share)
    base = k if old == new else 0  # an elastic epoch counts batches from where the new world size took over
    again.load_state_dict({**news[0].state_dict(), "batches_yielded": base + 1})
    assert [b.tolist() for b in again] == [b.tolist() for b in rest[0][1:]]
    # and the next epoch is a plain epoch of the new world size
    for s in news:
        s.set_epoch(2)
    fresh = [make(r, new) for r in range(new)]
    for s in fresh:
        s.set_epoch(2)
    assert [[b.tolist() for b in s] for s in news] == [[b.tolist() for b in s] for s in fresh]


def test_elastic_is_refused_where_the_plan_cannot_move():
    mk = lambda w: samplers.NGAMEBatchSampler(40, batch_size=4, cluster_size=2, rank=0, world_size=w)
    with pytest.raises(ValueError, match="same number of ranks"):
        mk(3).load_state_dict(mk(2).state_dict())


@pytest.mark.parametrize("old,new", [(2, 3), (4, 2)])
def test_mixture_continues_its_run_by_global_position(old, new):
    from mixtures.schedules import DomainUpsampling

    sched = DomainUpsampling({"a": 0.7, "b": 0.3}, {"a": 0.2, "b": 0.8}, final_fraction=0.3)
    sizes = {"a": 5000, "b": 5000}  # no domain wraps: every stream position is a distinct row
    mk = lambda r, w: samplers.MixtureBatchSampler(sizes, sched, batch_size=8, total_steps=40, seed=2, rank=r,
                                                   world_size=w)
    olds = [mk(r, old) for r in range(old)]
    k = 13
    consumed = []
    for s in olds:
        it = iter(s)
        consumed += [next(it) for _ in range(k)]
    news = [mk(r, new) for r in range(new)]
    for s in news:
        s.load_state_dict(olds[0].state_dict())
    rest = [list(s) for s in news]
    assert all(len(r) == 40 - k for r in rest) and len(news[0]) == 40 - k  # the run goes on at step k
    seen = np.concatenate(consumed + [b for r in rest for b in r])
    assert len(np.unique(seen)) == len(seen)  # each domain's stream continues where the old ranks left it
    # the schedule's shares hold at the steps the new ranks run (its last 30 % up-samples b)
    late = np.concatenate([b for r in rest for b in r[-10:]])
    assert abs((late >= 5000).mean() - 0.8) < 0.1  # per-batch rounding of 8 rows: 6 of 8 here


def _elastic_rank(rank: int, world: int, port: int, queue, state=None, k=0):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        s = samplers.TokenBudgetBatchSampler(np.arange(301) % 29 + 1, max_tokens=100, seed=9)  # rank from dist
        loader = datapipe.DataLoader(Rows(301), batch_sampler=s)
        if state is not None:
            loader.load_state_dict(state)
        got = []
        for b in loader:
            got.append(b.tolist())
            if k and len(got) == k:
                break
        out = [None] * world
        dist.all_gather_object(out, {"rows": got, "state": loader.state_dict(), "len": len(s)})
        if rank == 0:
            queue.put(out)
    finally:
        dist.destroy_process_group()


def _first_run(rank, world, port, queue):
    _elastic_rank(rank, world, port, queue, k=5)


def _second_run_factory(state):
    import functools

    return functools.partial(_second_run, state=state)


def _second_run(rank, world, port, queue, state):
    _elastic_rank(rank, world, port, queue, state=state)


def test_two_gloo_ranks_resume_on_three():
    first = run_ranks_with_queue(_first_run, world_size=2)
    consumed = [r for part in first for b in part["rows"] for r in b]
    second = run_ranks_with_queue(_second_run_factory(first[1]["state"]), world_size=3)
    assert len({len(p["rows"]) for p in second}) == 1
    rest = [r for part in second for b in part["rows"] for r in b]
    both = consumed + rest
    assert len(both) == len(set(both)) == 301


# ---- resume cost -------------------------------------------------------------------------------------------
class CountingBudget(samplers.TokenBudgetBatchSampler):
    builds: list

    def _build_plan(self, epoch):
        self.builds.append(epoch)
        return super()._build_plan(epoch)


def test_restoring_builds_the_current_epochs_plan_once():
    lengths = np.arange(500) % 60 + 1

    def make():
        s = CountingBudget(lengths, max_tokens=200, seed=1)
        s.builds = []
        return datapipe.DataLoader(Rows(500), batch_sampler=s), s

    a, _ = make()
    for _ in range(2):
        list(a)
    it = iter(a)
    for _ in range(3):
        next(it)
    state = a.state_dict()
    del it
    b, s = make()
    b.load_state_dict(state)
    rest = list(b)
    assert s.builds == [2], s.builds  # the epoch being resumed, once; nothing rebuilt at iter()
    assert len(rest) == len(s) - 3


# ---- a resume in a fresh process ---------------------------------------------------------------------------
FRESH = """
import json, sys
import numpy as np
import datapipe, samplers
from datapipe import collate
ds = datapipe.ArrowDataset.open(sys.argv[1])
s = samplers.TokenBudgetBatchSampler(ds.index["length"], max_tokens=64, seed=3)
loader = datapipe.DataLoader(ds, batch_sampler=s, num_workers=int(sys.argv[3]), collate_fn=collate.packed())
loader.load_state_dict(json.load(open(sys.argv[2])))
print(json.dumps([b["input_ids"].tolist() for b in loader]))
"""


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_in_a_fresh_interpreter(small_ds, tmp_path, num_workers):
    import json
    import subprocess
    import sys

    from datapipe import collate

    def make():
        s = samplers.TokenBudgetBatchSampler(small_ds.index["length"], max_tokens=64, seed=3)
        return datapipe.DataLoader(small_ds, batch_sampler=s, collate_fn=collate.packed())

    ref = [b["input_ids"].tolist() for b in make()]
    a = make()
    it = iter(a)
    for _ in range(4):
        next(it)
    (tmp_path / "state.json").write_text(json.dumps(a.state_dict()))
    out = subprocess.run([sys.executable, "-c", FRESH, str(small_ds.path), str(tmp_path / "state.json"),
                          str(num_workers)], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(out.stdout) == ref[4:]
