"""A real 2-process torch.distributed (gloo) group: each rank's DataLoader sees disjoint rows, and together
they see every row exactly once; rank and world size come from torch.distributed."""

import os

import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp

import datapipe
from tests.helpers import free_port


def _worker(rank, world, port, path, out):
    import samplers
    from datapipe import collate

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ds = datapipe.ArrowDataset.open(path)
        sampler = samplers.TokenBudgetBatchSampler(ds.index["length"], 64, seed=7)  # rank/world from dist
        assert (sampler.rank, sampler.world_size) == (rank, world)
        loader = datapipe.DataLoader(ds, batch_sampler=sampler, num_workers=1, collate_fn=collate.packed())
        rows = []
        for batch in loader:
            rows.extend(batch["row"].tolist())
        n = len(loader)
        counts = [None] * world
        dist.all_gather_object(counts, n)
        np.save(os.path.join(out, f"rank{rank}.npy"), np.array(rows, dtype=np.int64))
        assert len(set(counts)) == 1, counts
    finally:
        dist.destroy_process_group()


def test_two_ranks_disjoint_rows(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"input_ids": rng.integers(0, 9, rng.integers(1, 30)).tolist(), "row": i} for i in range(211)]
    path = datapipe.write_dataset(rows, tmp_path / "ds", shard_rows=50)
    mp.start_processes(_worker, args=(2, free_port(), str(path), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    r0, r1 = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    assert len(np.intersect1d(r0, r1)) == 0
    assert sorted(np.concatenate([r0, r1]).tolist()) == list(range(211))
