"""PackedDurationSampler (best-fit decreasing packs) and the padding-free features collator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from samplers import PackedDurationSampler
from tests.helpers import assert_exactly_once, assert_sampler_resumes_exactly


def issue_durations(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a, b = int(0.6 * n), int(0.3 * n)
    d = np.concatenate([rng.normal(14.5, 1.7, a), rng.uniform(1, 12, b), rng.normal(17, 4.5, n - a - b)])
    return rng.permutation(d.clip(1, 35))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 500), st.integers(1, 4), st.sampled_from([None, 1, 8]), st.sampled_from([None, 3]),
       st.integers(0, 2**31), st.integers(0, 2), st.booleans())
def test_packs_fit_and_no_cut_is_lost(n, world_size, window_packs, max_cuts, seed, epoch, drop_last):
    d = np.random.default_rng(seed).uniform(0.1, 40, n)
    kw = dict(max_duration=37.5, window_packs=window_packs, max_cuts=max_cuts, seed=seed, world_size=world_size,
              drop_last=drop_last)
    usable = int((d <= 37.5).sum())
    if not drop_last and 0 < usable < world_size:
        with pytest.raises(ValueError, match="world_size"):
            PackedDurationSampler(d, rank=0, **kw)
        return
    samplers = [PackedDurationSampler(d, rank=r, **kw) for r in range(world_size)]
    for s in samplers:
        s.set_epoch(epoch)
    batches = [list(s) for s in samplers]
    st_ = samplers[0].stats()
    assert st_["dropped"].get("longer_than_max_duration", 0) == n - usable
    assert_exactly_once(batches, n, st_["dropped_rows"])
    if not drop_last:
        assert st_["dropped_rows"] == n - usable
    for rb in batches:
        for b in rb:
            assert d[b].sum() <= 37.5 + 1e-9
            assert max_cuts is None or len(b) <= max_cuts


def test_packing_is_tight_and_random_on_the_issue_distribution():
    d = issue_durations(100_000)
    s = PackedDurationSampler(d, max_duration=600.0)
    st_ = s.stats()
    assert st_["fill_fraction"] > 0.98
    assert st_["max_pack_duration"] <= 600.0
    assert st_["padding_fraction"] == 0.0
    a = [set(b.tolist()) for b in s]
    s.set_epoch(1)
    owner = np.empty(len(d), np.int64)
    for i, b in enumerate(s):
        owner[b] = i
    same = sum(len({int(owner[x]) for x in p}) == 1 for p in a)
    assert same / len(a) < 0.05  # packs are new each epoch
    tight = PackedDurationSampler(d, max_duration=600.0, window_packs=None).stats()
    assert tight["num_batches"] <= np.ceil(d.sum() / 600.0) + 2


def test_resumes_exactly():
    d = issue_durations(800, 3)
    make = lambda: PackedDurationSampler(d, max_duration=120.0, seed=4, rank=1, world_size=3, window_packs=4)
    assert_sampler_resumes_exactly(make, epochs=2, steps=[0, 1, 7, 10**6])


@pytest.mark.parametrize("kw, match", [(dict(max_duration=0), "max_duration must be a finite number > 0"),
                                       (dict(max_duration=np.inf), "max_duration must be a finite number > 0"),
                                       (dict(max_duration=10, window_packs=0), "window_packs must be"),
                                       (dict(max_duration=10, max_cuts=0), "max_cuts must be"),
                                       (dict(max_duration=1.5, on_long="error"), "cut 2 lasts 2.000 s")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        PackedDurationSampler(np.array([1.0, 1.0, 2.0]), **kw)


def test_bad_durations():
    with pytest.raises(ValueError, match="must be > 0: row 1"):
        PackedDurationSampler(np.array([1.0, 0.0]), max_duration=10)


# ---------------------------------------------------------------------------------------------------------------
def test_collator_on_a_real_dataset_and_on_row_dicts(tmp_path):
    from datapipe import ArrowDataset
    from datapipe.audio import ingest_audio
    from datapipe.collate.features import collate_features, features_collator

    rng = np.random.default_rng(0)
    mats = [rng.normal(size=(int(t), 8)).astype(np.float32) for t in rng.integers(5, 60, 40)]
    paths = []
    for i, m in enumerate(mats):
        p = tmp_path / f"u{i:03d}.npy"
        np.save(p, m)
        paths.append(p)
    ds = ArrowDataset.open(ingest_audio(paths, tmp_path / "ds", frame_shift=0.01, shard_rows=16))
    np.testing.assert_allclose(ds.index["duration"], [len(m) * 0.01 for m in mats])
    sampler = PackedDurationSampler(ds.index["duration"], max_duration=1.0, seed=1)
    seen = []
    for b in sampler:
        out = collate_features(ds.__getitems__(b))
        lens = np.array([len(mats[i]) for i in b])
        assert out["cu_seqlens"].dtype == torch.int32
        assert out["cu_seqlens"].tolist() == [0, *np.cumsum(lens).tolist()]
        assert out["features"].shape == (lens.sum(), 8)
        np.testing.assert_array_equal(out["features"].numpy(), np.concatenate([mats[i] for i in b]))
        assert out["max_seqlen"] == lens.max() and out["lengths"].tolist() == lens.tolist()
        assert out["duration"].dtype == torch.float64 and out["id"] == [f"u{i:03d}" for i in b]
        assert lens.sum() <= 100  # 1 s of 10 ms frames
        # rows as dicts give the same tensors
        rows = features_collator()([ds[int(i)] for i in b])
        assert torch.equal(rows["features"], out["features"]) and torch.equal(rows["cu_seqlens"], out["cu_seqlens"])
        seen += b.tolist()
    assert sorted(seen) == list(range(40))


def test_collator_waveforms_and_errors():
    from datapipe.collate.features import collate_features
    from datapipe.dataset import Ragged

    r = Ragged(np.arange(10, dtype=np.float32), np.array([0, 4, 10]))
    out = collate_features({"audio": r, "duration": np.array([0.25, 0.375])})
    assert out["features"].shape == (10,) and out["cu_seqlens"].tolist() == [0, 4, 10]
    with pytest.raises(ValueError, match="not a multiple of feature_dim=3"):
        collate_features({"features": r}, feature_dim=3)
    with pytest.raises(KeyError, match="neither 'features' nor 'audio'"):
        collate_features({"input_ids": r})
    with pytest.raises(ValueError, match="different feature dims"):
        collate_features({"features": r, "feature_dim": np.array([2, 5])})
    rows = [{"features": np.ones((3, 2))}, {"features": np.ones((2, 2))}]
    assert collate_features(rows)["cu_seqlens"].tolist() == [0, 3, 5]
