import numpy as np
import pytest
import torch
import torch.utils.data as tud

import datapipe
import samplers
from datapipe import collate
from tests.helpers import assert_loader_resumes_exactly, to_plain


class Squares(tud.Dataset):
    def __len__(self):
        return 23

    def __getitem__(self, i):
        return torch.tensor([i, i * i])


class Stream(tud.IterableDataset):
    def __iter__(self):
        return iter(torch.arange(30).split(1))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_datapipe_sampler(small_ds, num_workers):
    def make():
        return datapipe.DataLoader(small_ds, batch_sampler=samplers.RandomBatchSampler(len(small_ds), 16, seed=1),
                                   num_workers=num_workers, collate_fn=collate.packed())

    steps = None if num_workers == 0 else [0, 1, 5, 6, 7, 11, 12]  # 7 batches per epoch, 2 epochs
    assert_loader_resumes_exactly(make, steps=steps)


@pytest.mark.parametrize("num_workers,persistent", [(0, False), (2, True)])
def test_resume_drop_in_shuffle(small_ds, num_workers, persistent):
    def make():
        return datapipe.DataLoader(small_ds, batch_size=10, shuffle=True, seed=3, num_workers=num_workers,
                                   persistent_workers=persistent, collate_fn=collate.pad())

    assert_loader_resumes_exactly(make, steps=None if num_workers == 0 else [0, 4, 9, 10, 11, 19, 20])


def test_resume_with_foreign_samplers():
    ds = Squares()
    assert_loader_resumes_exactly(lambda: datapipe.DataLoader(ds, batch_size=4))
    dist = lambda: datapipe.DataLoader(ds, batch_size=3, sampler=tud.DistributedSampler(ds, 2, 1, seed=4))
    assert_loader_resumes_exactly(dist)
    # as with torch, the user's DistributedSampler.set_epoch decides the order; the loader never overrides it
    for epoch in (0, 5):
        ours, theirs = dist(), tud.DataLoader(ds, batch_size=3, sampler=tud.DistributedSampler(ds, 2, 1, seed=4))
        ours.sampler.set_epoch(epoch)
        theirs.sampler.set_epoch(epoch)
        assert to_plain(list(ours)) == to_plain(list(theirs)) == to_plain(list(ours))
    assert_loader_resumes_exactly(lambda: datapipe.DataLoader(ds, batch_size=None))  # no auto-collation


def test_resume_iterable_dataset():
    assert_loader_resumes_exactly(lambda: datapipe.DataLoader(Stream(), batch_size=7))


def test_epoch_advances_unless_set(small_ds):
    loader = datapipe.DataLoader(small_ds, batch_size=10, shuffle=True, seed=0, collate_fn=collate.pad())
    e0 = to_plain(list(loader))
    e1 = to_plain(list(loader))
    assert loader.epoch == 2 and e0 != e1  # positioned at the epoch the next iter() runs
    loader.set_epoch(0)
    assert to_plain(list(loader)) == e0
    loader.set_epoch(1)
    assert to_plain(list(loader)) == e1


def test_shuffle_false_is_sequential_and_drop_last(small_ds):
    loader = datapipe.DataLoader(small_ds, batch_size=10, drop_last=True)
    assert len(loader) == 9
    got = [b["score"] for b in loader]
    assert torch.cat(got).tolist() == [i * 0.5 for i in range(90)]
    assert loader.batch_size == 10 and loader.drop_last  # torch attributes stay what the user passed


def test_indices_travel_as_numpy(small_ds):
    seen = []
    loader = datapipe.DataLoader(small_ds, batch_sampler=samplers.RandomBatchSampler(len(small_ds), 8),
                                 collate_fn=lambda b: seen.append(b.indices) or b)
    next(iter(loader))
    assert isinstance(seen[0], np.ndarray) and seen[0].dtype == np.int64


def test_state_validation(small_ds):
    loader = datapipe.DataLoader(small_ds, batch_size=10)
    with pytest.raises(ValueError, match="version"):
        loader.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="exceeds"):
        loader.load_state_dict({**loader.state_dict(), "batches_delivered": 99})
    with pytest.raises(ValueError, match="batch_size"):
        datapipe.DataLoader(small_ds, batch_size=11).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="epoch must be"):
        loader.set_epoch(-1)


def test_accepts_every_torch_argument(small_ds):
    import inspect

    ours = inspect.signature(datapipe.DataLoader.__init__).parameters
    theirs = inspect.signature(tud.DataLoader.__init__).parameters
    assert set(theirs) <= set(ours)
    for name, p in theirs.items():
        assert ours[name].default == p.default or name == "self", name
    assert isinstance(datapipe.DataLoader(small_ds), tud.DataLoader)


def test_epoch_is_forwarded_to_a_collate_with_set_epoch(small_ds):
    class Tagged:
        epoch = None

        def set_epoch(self, e):
            self.epoch = e

        def __call__(self, batch):
            return torch.tensor([self.epoch])

    tag = Tagged()
    loader = datapipe.DataLoader(small_ds, batch_size=50, collate_fn=tag)
    assert [b.item() for b in loader] == [0, 0]
    assert [b.item() for b in loader] == [1, 1]


@pytest.mark.parametrize("make_collate", [collate.pad, collate.packed])
def test_workers_deliver_the_same_tensors_as_the_main_process(small_ds, make_collate):
    def run(workers):
        sampler = samplers.RandomBatchSampler(len(small_ds), 16, seed=2)
        return to_plain(list(datapipe.DataLoader(small_ds, batch_sampler=sampler, num_workers=workers,
                                                 collate_fn=make_collate())))

    assert run(0) == run(2)
