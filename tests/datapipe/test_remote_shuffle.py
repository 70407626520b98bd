"""The loader's own shuffle is shard-local for a dataset on object storage (issue 15, item 2), through a real S3
server on loopback: few shards per batch, every row once per epoch, exact resume."""

import shutil

import numpy as np
import pytest
import torch

import datapipe
from datapipe.orders import SeededRandomSampler

SHARD_ROWS, SHARDS = 20, 12


@pytest.fixture(scope="module")
def remote(server, tmp_path_factory):
    rows = [{"input_ids": np.arange(i % 7 + 1, dtype=np.int32) + i, "id": i} for i in range(SHARD_ROWS * SHARDS)]
    local = datapipe.write_dataset(rows, tmp_path_factory.mktemp("local") / "ds", shard_rows=SHARD_ROWS)
    shutil.copytree(local, server.object_path("shuffled"))
    server.settle()
    return local


def open_remote(server, tmp_path):
    return datapipe.ArrowDataset.open(server.url("shuffled"), filesystem=server.filesystem(),
                                      cache_dir=tmp_path / "cache")


def ids(batch) -> list[int]:
    return batch["id"].tolist()


def test_shuffle_over_a_remote_dataset_reads_a_window_of_shards_per_batch(server, remote, tmp_path):
    ds = open_remote(server, tmp_path)
    assert ds.is_remote and not datapipe.ArrowDataset.open(remote).is_remote
    assert ds.shard_offsets.tolist() == list(range(0, SHARD_ROWS * SHARDS + 1, SHARD_ROWS))
    loader = datapipe.DataLoader(ds, batch_size=16, shuffle=True, seed=3, shard_window=2)
    assert isinstance(loader.sampler, SeededRandomSampler) and loader.sampler.shard_offsets is not None
    local = datapipe.DataLoader(datapipe.ArrowDataset.open(remote), batch_size=16, shuffle=True, seed=3)
    touched = {name: [] for name in ("remote", "local")}
    for name, dl in (("remote", loader), ("local", local)):
        seen = []
        for b in dl:
            seen += ids(b)
            touched[name].append(len({i // SHARD_ROWS for i in ids(b)}))
        assert sorted(seen) == list(range(SHARD_ROWS * SHARDS)), name  # every row once
    assert max(touched["remote"]) <= 2 * 2  # one or two windows of 2 shards
    assert np.mean(touched["remote"]) < np.mean(touched["local"]) / 2  # the global shuffle reads many more
    epoch0 = [ids(b) for b in loader]  # the next epoch: another order
    assert epoch0 != [ids(b) for b in datapipe.DataLoader(ds, batch_size=16, shuffle=True, seed=3, shard_window=2)]


def test_shard_local_order_without_a_seed_draws_from_torch_and_resumes_exactly(server, remote, tmp_path):
    ds = open_remote(server, tmp_path)
    torch.manual_seed(0)
    loader = datapipe.DataLoader(ds, batch_size=16, shuffle=True)
    it = iter(loader)
    first = [ids(next(it)) for _ in range(3)]
    state = loader.state_dict()
    rest = [ids(b) for b in it]
    assert sorted(sum(first + rest, [])) == list(range(SHARD_ROWS * SHARDS))
    torch.manual_seed(123)  # another RNG state: the recorded seed decides the resumed epoch
    again = datapipe.DataLoader(open_remote(server, tmp_path / "b"), batch_size=16, shuffle=True)
    again.load_state_dict(state)
    assert [ids(b) for b in again] == rest
    torch.manual_seed(0)
    assert [ids(b) for b in datapipe.DataLoader(ds, batch_size=16, shuffle=True)][:3] == first
