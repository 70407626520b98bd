"""Tests for datapipe.immiscible.ImmiscibleCollate: noise aligned with the batch, a pure function of seed, rank,
epoch and the batch's rows (not of the worker or call order), through real DataLoader workers, a real gloo group
and a real Arrow dataset; and the deprecated ``samplers.immiscible`` alias."""

from __future__ import annotations

import importlib
import os
import sys

import numpy as np
import pytest
import torch

from datapipe.immiscible import METHODS, ImmiscibleCollate, assign_linear


def _gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# ---------------------------------------------------------------- collate wrapper

class _Digits(torch.utils.data.Dataset):
    def __init__(self, n: int = 24) -> None:
        self.x = torch.randn(n, 1, 8, 8, generator=_gen(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "label": i}


def _noises(loader) -> list[torch.Tensor]:
    out = []
    for batch in loader:
        assert batch["noise"].shape == batch["pixel_values"].shape
        out.append(batch["noise"])
    return out


@pytest.mark.parametrize("method", sorted(METHODS))
def test_collate_adds_aligned_noise(method: str) -> None:
    ds = _Digits()
    col = ImmiscibleCollate(None, key="pixel_values", method=method, k=8, seed=3)
    batch = col([ds[i] for i in range(6)])
    assert set(batch) == {"pixel_values", "label", "noise"}
    assert batch["noise"].shape == (6, 1, 8, 8) and batch["noise"].dtype == torch.float32
    if method == "linear":
        # aligned: the LA permutation puts each image with its nearest-by-assignment noise
        ref = assign_linear(batch["pixel_values"], batch["noise"][torch.randperm(6, generator=_gen(0))])
        torch.testing.assert_close(ref, batch["noise"])


def test_collate_is_a_function_of_seed_rank_epoch_and_rows() -> None:
    ds = _Digits()
    samples = [ds[i] for i in range(8)]
    others = [ds[i] for i in range(8, 16)]

    def first(**kw) -> torch.Tensor:
        return ImmiscibleCollate(None, k=4, **kw)(samples)["noise"]

    base = first(seed=1, rank=0)
    assert torch.equal(base, first(seed=1, rank=0))
    assert not torch.equal(base, first(seed=2, rank=0))
    assert not torch.equal(base, first(seed=1, rank=1))
    col = ImmiscibleCollate(None, k=4, seed=1, rank=0)
    other = col(others)["noise"]  # a call on other rows first: the noise of `samples` does not depend on it
    assert torch.equal(col(samples)["noise"], base) and torch.equal(col(samples)["noise"], base)
    assert not torch.equal(other[: len(base)], base)
    col.set_epoch(1)
    assert not torch.equal(col(samples)["noise"], base)
    col.set_epoch(0)
    assert torch.equal(col(samples)["noise"], base)
    swapped = col(samples[::-1])["noise"]  # other rows in the batch (here: another order) draw other noise
    assert not torch.equal(swapped.flip(0), base)


def test_collate_noise_is_the_same_for_any_num_workers() -> None:
    ds = _Digits(24)
    col = ImmiscibleCollate(None, k=4, seed=5, rank=0)

    def run(workers: int) -> list[torch.Tensor]:
        dl = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=col, shuffle=False)
        return _noises(dl)

    a, b = run(2), run(0)
    assert len(a) == len(b) == 6
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    main = ImmiscibleCollate(None, k=4, seed=5, rank=0)([ds[i] for i in range(8, 12)])["noise"]
    assert torch.equal(a[2], main)  # batch 2 (rows 8..11), collated in a worker, equals a call in this process
    assert not any(torch.equal(a[i], a[j]) for i in range(len(a)) for j in range(i))


def test_collate_bad_arguments() -> None:
    with pytest.raises(ValueError, match="method must be one of"):
        ImmiscibleCollate(None, method="hungarian")
    with pytest.raises(ValueError, match="k must be >= 1"):
        ImmiscibleCollate(None, k=0)
    col = ImmiscibleCollate(lambda s: {"x": torch.stack(s)}, key="pixel_values")
    with pytest.raises(KeyError, match="pixel_values"):
        col([torch.randn(3)])
    col = ImmiscibleCollate(lambda s: {"pixel_values": torch.stack(s).long()})
    with pytest.raises(TypeError, match="floating-point"):
        col([torch.ones(3)])
    col = ImmiscibleCollate(lambda s: torch.stack(s))
    with pytest.raises(TypeError, match="Mapping"):
        col([torch.ones(3)])


def _gloo_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        col = ImmiscibleCollate(None, k=4, seed=9)  # rank read from the process group
        x = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8).expand(4, -1, -1, -1)
        noise = col([{"pixel_values": xi} for xi in x])["noise"]
        torch.save({"rank": col.rank, "noise": noise}, os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_collate_rank_from_gloo_group(tmp_path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    assert [g["rank"] for g in got] == [0, 1]
    assert not torch.equal(got[0]["noise"], got[1]["noise"])
    x = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8).expand(4, -1, -1, -1)
    for r in (0, 1):
        ref = ImmiscibleCollate(None, k=4, seed=9, rank=r)([{"pixel_values": xi} for xi in x])["noise"]
        assert torch.equal(ref, got[r]["noise"])


def _digits_dataset(tmp_path, n: int = 120):
    import pyarrow as pa
    from sklearn.datasets import load_digits

    from datapipe import ArrowDataset, write_dataset

    x = load_digits().data[:n].astype(np.float32) / 8 - 1
    table = pa.table({"pixel_values": pa.array(list(x), type=pa.list_(pa.float32())), "label": np.arange(n)})
    return ArrowDataset.open(write_dataset(table, tmp_path / "digits", shard_rows=50)), x


def test_collate_on_arrow_dataset_is_worker_and_resume_invariant(tmp_path) -> None:
    """Real Arrow shards through datapipe.DataLoader: noise keyed by rows, same for any num_workers and resume."""
    from datapipe import DataLoader
    from datapipe.collate import default

    ds, x = _digits_dataset(tmp_path)

    def loader(workers: int) -> DataLoader:
        col = ImmiscibleCollate(default, key="pixel_values", k=4, seed=3, rank=0, shape=(1, 8, 8))
        return DataLoader(ds, batch_size=16, shuffle=True, num_workers=workers, collate_fn=col, seed=11)

    ref = list(loader(0))
    assert len(ref) == 8
    for b in ref:  # images come back as [B, 1, 8, 8] rows of the dataset, noise aligned with them
        assert b["noise"].shape == b["pixel_values"].shape == (len(b["label"]), 1, 8, 8)
        np.testing.assert_array_equal(b["pixel_values"].reshape(len(b["label"]), 64).numpy(), x[b["label"].numpy()])
    two = list(loader(2))
    assert all(torch.equal(a["noise"], b["noise"]) for a, b in zip(ref, two))
    first = loader(2)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    del it
    resumed = loader(2)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 5
    assert all(torch.equal(a["noise"], b["noise"]) for a, b in zip(ref[3:], rest))
    assert not any(torch.equal(ref[i]["noise"], ref[j]["noise"]) for i in range(8) for j in range(i))


def test_collate_stacks_row_lists_and_checks_shape() -> None:
    col = ImmiscibleCollate(lambda s: {"pixel_values": list(s)}, k=2, rank=0, shape=(2, 3))
    out = col([torch.ones(6), torch.zeros(6)])
    assert out["pixel_values"].shape == out["noise"].shape == (2, 2, 3)
    with pytest.raises(ValueError, match="rows differ in shape"):
        ImmiscibleCollate(lambda s: {"pixel_values": list(s)}, rank=0)([torch.ones(6), torch.ones(5)])
    with pytest.raises(ValueError, match="cannot be viewed as shape"):
        ImmiscibleCollate(lambda s: {"pixel_values": list(s)}, rank=0, shape=(4, 4))([torch.ones(6)])


def test_samplers_immiscible_is_a_deprecated_alias() -> None:
    import datapipe
    import datapipe.immiscible
    import samplers

    sys.modules.pop("samplers.immiscible", None)
    with pytest.warns(DeprecationWarning, match="moved to datapipe.immiscible"):
        old = importlib.import_module("samplers.immiscible")
    assert old.ImmiscibleCollate is datapipe.immiscible.ImmiscibleCollate is datapipe.ImmiscibleCollate
    assert samplers.ImmiscibleCollate is datapipe.ImmiscibleCollate
    assert samplers.knn_noise_exact is datapipe.immiscible.knn_noise_exact
    assert "ImmiscibleCollate" not in samplers.__all__ and "immiscible" not in samplers.__all__
