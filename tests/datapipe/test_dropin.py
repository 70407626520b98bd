"""``datapipe.DataLoader`` behaves as ``torch.utils.data.DataLoader`` where users rely on it (issue 18): torch's
iterator objects, errors that do not end the epoch, plans that follow ``len(dataset)``, generic typing, ``int``
indices, torch's RNG use and orders, truthful ``sampler``/``batch_sampler``; plus exact resume of torch's orders."""

from __future__ import annotations

import pytest
import torch
import torch.utils.data as tud
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter, _SingleProcessDataLoaderIter

import datapipe
from tests.helpers import assert_loader_resumes_exactly, to_plain


class Rows(tud.Dataset):
    def __init__(self, n: int, bad: tuple[int, ...] = ()):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if type(i) is not int:
            raise TypeError(f"__getitem__ got {type(i).__name__}")
        if i in self.bad:
            raise KeyError(f"row {i} is bad")
        return torch.tensor(i)


class Growing(tud.Dataset):
    def __init__(self):
        self.n = 5

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


@pytest.mark.parametrize("workers", [0, 2])
def test_iterator_is_torchs_and_has_a_length(workers):
    loader = datapipe.DataLoader(Rows(10), batch_size=3, num_workers=workers)
    it = iter(loader)
    assert isinstance(it, (_SingleProcessDataLoaderIter, _MultiProcessingDataLoaderIter))
    assert len(it) == len(loader) == 4
    if workers:
        assert len(it._workers) == workers
    assert sum(len(b) for b in it) == 10


@pytest.mark.parametrize("workers", [0, 2])
def test_an_exception_in_one_batch_does_not_end_the_epoch(workers):
    loader = datapipe.DataLoader(Rows(20, bad=(7,)), batch_size=2, num_workers=workers)
    got, errors = [], 0
    it = iter(loader)
    while True:
        try:
            got.append(next(it).tolist())
        except StopIteration:
            break
        except KeyError:
            errors += 1
            state = loader.state_dict()
            assert state["batches_delivered"] == 4  # the failed batch counts: a resume goes on after it
    assert errors == 1 and len(got) == 9
    assert sorted(r for b in got for r in b) == [r for r in range(20) if r not in (6, 7)]
    resumed = datapipe.DataLoader(Rows(20, bad=(7,)), batch_size=2, num_workers=workers)
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == got[3:]


def test_plan_follows_len_dataset_at_each_iter():
    ds = Growing()
    for shuffle in (False, True):
        loader = datapipe.DataLoader(ds, batch_size=2, shuffle=shuffle)
        for expect in (5, 6, 7):
            ds.n = expect
            assert len(loader) == -(-expect // 2)
            rows = [r for b in loader for r in b.tolist()]
            assert sorted(rows) == list(range(expect))


def test_generic_like_torch():
    alias = datapipe.DataLoader[list[torch.Tensor]]
    assert alias.__origin__ is datapipe.DataLoader


@pytest.mark.parametrize("batch_size", [None, 3])
def test_getitem_receives_python_ints(batch_size):
    for b in datapipe.DataLoader(Rows(7), batch_size=batch_size, shuffle=True):
        assert b.dtype == torch.int64  # Rows raises on anything but int


def test_building_a_loader_consumes_no_global_rng():
    torch.manual_seed(3)
    want = torch.rand(3)
    torch.manual_seed(3)
    datapipe.DataLoader(Rows(10), batch_size=2, shuffle=False)
    datapipe.DataLoader(Rows(10), batch_size=2, shuffle=True)
    assert torch.equal(torch.rand(3), want)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("with_generator", [False, True])
def test_same_order_as_torch_for_the_same_seed(workers, with_generator):
    def run(cls):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(11) if with_generator else None
        loader = cls(Rows(30), batch_size=4, shuffle=True, num_workers=workers, generator=gen)
        out = []
        for epoch in range(2):
            if not with_generator:
                torch.manual_seed(100 + epoch)
            out.append(to_plain(list(loader)))
        return out, torch.rand(2).tolist()  # what is left of the global RNG

    assert run(datapipe.DataLoader) == run(tud.DataLoader)


def test_sampler_attributes_tell_the_truth():
    plain = datapipe.DataLoader(Rows(10), batch_size=2, shuffle=True)
    assert type(plain.sampler) is tud.RandomSampler and type(plain.batch_sampler) is tud.BatchSampler
    seeded = datapipe.DataLoader(Rows(10), batch_size=2, shuffle=True, seed=4)
    assert isinstance(seeded.sampler, datapipe.SeededRandomSampler)
    first = [r for b in seeded for r in b.tolist()]
    seeded.sampler.set_epoch(0)
    assert list(seeded.sampler) == first  # the sampler the loader reports is the one whose order it used


def test_torch_order_with_a_generator_resumes_exactly_across_epochs():
    def make():
        return datapipe.DataLoader(Rows(23), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5))

    assert_loader_resumes_exactly(make, steps=[0, 1, 3, 5, 6, 7, 11, 12])


@pytest.mark.parametrize("workers", [0, 2])
def test_torch_order_from_the_global_rng_resumes_the_started_epoch(workers):
    # the order torch draws from the global RNG at iter() is recorded, so the rest of that epoch is exact; later
    # epochs draw from the global RNG as torch does (pass seed= for runs reproducible across restarts)
    def make():
        return datapipe.DataLoader(Rows(23), batch_size=4, shuffle=True, num_workers=workers)

    torch.manual_seed(0)
    ref = [b.tolist() for b in make()]
    for k in (1, 3, 5):
        torch.manual_seed(0)
        a = make()
        it = iter(a)
        head = [next(it).tolist() for _ in range(k)]
        state = a.state_dict()
        del it
        b = make()
        b.load_state_dict(state)
        assert head + [x.tolist() for x in b] == ref


def test_replayed_sampler_order_is_the_users():
    class Reverse(tud.Sampler):
        def __init__(self, n):
            self.n = n

        def __iter__(self):
            return iter(range(self.n - 1, -1, -1))

        def __len__(self):
            return self.n

    loader = datapipe.DataLoader(Rows(9), batch_size=4, sampler=Reverse(9))
    assert [b.tolist() for b in loader] == [[8, 7, 6, 5], [4, 3, 2, 1], [0]]
    assert_loader_resumes_exactly(lambda: datapipe.DataLoader(Rows(9), batch_size=4, sampler=Reverse(9)))


@pytest.mark.parametrize("persistent", [False, True])
def test_deleting_the_loader_and_iterator_ends_the_workers_at_once(persistent):
    loader = datapipe.DataLoader(Rows(40), batch_size=2, num_workers=2, persistent_workers=persistent)
    it = iter(loader)
    next(it)
    workers = list(it._workers)
    del it, loader  # no reference cycle: freed now, as with torch, not at the next garbage collection
    for w in workers:
        w.join(timeout=30)
        assert not w.is_alive()


@pytest.mark.parametrize("workers", [0, 2])
def test_device_copy_one_step_ahead_keeps_the_state_exact(workers):
    def make():
        return datapipe.DataLoader(Rows(30, bad=(9,)), batch_size=4, shuffle=True, seed=2, num_workers=workers,
                                   device="cpu")

    ref = datapipe.DataLoader(Rows(30, bad=(9,)), batch_size=4, shuffle=True, seed=2)
    want = []
    it = iter(ref)
    for _ in range(len(ref)):
        try:
            want.append(next(it).tolist())
        except KeyError:
            want.append("error")
    loader = make()
    it = iter(loader)
    assert len(it) == len(loader) == 8
    got = []
    for _ in range(3):
        try:
            got.append(next(it).tolist())
        except KeyError:
            got.append("error")
    state = loader.state_dict()
    assert state["batches_delivered"] == 3  # the batch copied ahead is not counted until handed over
    resumed = make()
    resumed.load_state_dict(state)
    rest = []
    it = iter(resumed)
    while True:
        try:
            rest.append(next(it).tolist())
        except KeyError:
            rest.append("error")
        except StopIteration:
            break
    assert got + rest == want
    assert resumed.epoch == 1  # the pass ended: positioned at the next epoch


def test_thread_prefetch_through_the_loader_is_exact(small_ds):
    from datapipe import collate

    def make(prefetch):
        import samplers

        s = samplers.RandomBatchSampler(len(small_ds), 8, seed=4)
        return datapipe.DataLoader(small_ds, batch_sampler=s, collate_fn=collate.packed(), prefetch=prefetch)

    want = to_plain(list(make(0)))
    assert to_plain(list(make(3))) == want
    a = make(3)
    it = iter(a)
    head = [next(it) for _ in range(4)]
    state = a.state_dict()
    assert state["batches_delivered"] == 4  # not the batches the threads loaded ahead
    del it
    b = make(3)
    b.load_state_dict(state)
    assert to_plain(head + list(b)) == want
    with pytest.raises(ValueError, match="prefetch"):
        datapipe.DataLoader(small_ds, batch_size=4, prefetch=2, num_workers=2)
