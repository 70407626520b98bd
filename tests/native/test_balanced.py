"""Balanced hierarchical 2-means (NGAME / pyxclib): kernel vs a per-group numpy reference, balance, determinism."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from native.balanced import balanced_kmeans, init_pairs, leaf_sizes

DEVICES = ["cpu", "torch-cpu"]


def reference_balanced_kmeans(x: np.ndarray, num_clusters: int, seed: int, niter: int) -> np.ndarray:
    """Plain numpy, one group at a time, recursive (the reference's shape): same picks, same balanced rule."""
    x = np.asarray(x, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    P = np.concatenate([[0], np.cumsum(leaf_sizes(len(x), num_clusters))])
    ids = np.empty(len(x), dtype=np.int64)

    def split(rows: np.ndarray, lo: int, hi: int, level: int) -> None:
        if hi - lo == 1:
            ids[rows] = lo
            return
        mid = lo + (hi - lo) // 2
        left = P[mid] - P[lo]
        a, b = init_pairs(seed, level, np.array([lo]), np.array([len(rows)]))[0]
        X = x[rows]
        c0, c1 = X[a], X[b]
        prev, order = None, None
        for _ in range(niter):
            score = X @ (c0 - c1)
            order = np.argsort(-score, kind="stable")
            in_left = np.zeros(len(rows), bool)
            in_left[order[:left]] = True
            if prev is not None and (in_left == prev).all():
                break
            prev = in_left
            c0, c1 = X[in_left].sum(0), X[~in_left].sum(0)
            c0, c1 = c0 / max(np.linalg.norm(c0), 1e-12), c1 / max(np.linalg.norm(c1), 1e-12)
        rows = rows[order]
        split(rows[:left], lo, mid, level + 1)
        split(rows[left:], mid, hi, level + 1)

    if len(x):
        split(np.arange(len(x)), 0, num_clusters, 0)
    return ids


def planted(num_groups: int, group_size: int, dim: int, seed: int, noise: float = 0.01):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_groups, dim))
    labels = np.repeat(np.arange(num_groups), group_size)
    x = centres[labels] + noise * rng.normal(size=(len(labels), dim))
    perm = rng.permutation(len(labels))
    return x[perm].astype(np.float32), labels[perm]


@settings(max_examples=30, deadline=None)
@given(groups=st.integers(1, 24), size=st.integers(1, 9), seed=st.integers(0, 2**31), dim=st.sampled_from([16, 48]))
def test_kernels_agree_with_reference_on_planted_data(groups, size, seed, dim):
    x, labels = planted(groups, size, dim, seed)
    ref = reference_balanced_kmeans(x, groups, seed, 10)
    for dev in DEVICES:
        got = balanced_kmeans(x, num_clusters=groups, seed=seed, device=dev)
        np.testing.assert_array_equal(got, ref, err_msg=dev)
    # and the planted groups are found: every cluster holds exactly one planted group
    assert all(len(np.unique(labels[ref == k])) == 1 for k in range(groups))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 300), cluster_size=st.integers(1, 40), seed=st.integers(0, 2**20),
       dev=st.sampled_from(DEVICES))
def test_balanced_for_any_n(n, cluster_size, seed, dev):
    x = np.random.default_rng(seed).normal(size=(n, 5))
    ids = balanced_kmeans(x, cluster_size, seed=seed, device=dev)
    assert ids.dtype == np.int64 and ids.shape == (n,)
    if n == 0:
        return
    K = -(-n // cluster_size)
    sizes = np.bincount(ids, minlength=K)
    assert len(sizes) == K
    assert sizes.max() - sizes.min() <= 1 and sizes.max() <= cluster_size and sizes.min() >= 1


def test_near_reference_objective_on_unstructured_data():
    # Without planted structure, rounding can flip near-ties; the partitions' quality must still match.
    x = np.random.default_rng(1).normal(size=(600, 12)).astype(np.float32)

    def cohesion(ids):
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        tot = 0.0
        for k in np.unique(ids):
            c = u[ids == k].sum(0)
            tot += np.linalg.norm(c)
        return tot

    ref = cohesion(reference_balanced_kmeans(x, 40, 3, 10))
    rand = cohesion(np.random.default_rng(0).permutation(np.arange(600) % 40))
    for dev in DEVICES:
        got = cohesion(balanced_kmeans(x, num_clusters=40, seed=3, device=dev))
        assert abs(got - ref) / ref < 0.03, (dev, got, ref)
        assert got > 1.5 * rand


def test_deterministic_for_a_seed_and_thread_count():
    x = np.random.default_rng(2).normal(size=(2000, 24)).astype(np.float32)
    a = balanced_kmeans(x, 7, seed=5)
    b = balanced_kmeans(x, 7, seed=5)
    np.testing.assert_array_equal(a, b)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        np.testing.assert_array_equal(balanced_kmeans(x, 7, seed=5), a)
    finally:
        numba.set_num_threads(old)
    assert not np.array_equal(balanced_kmeans(x, 7, seed=6), a)


def test_tree_order_ids_put_siblings_next_to_each_other():
    # 8 planted groups in 4 well separated super-groups: sibling leaves (2j, 2j+1) share a super-group
    rng = np.random.default_rng(0)
    supers = rng.normal(size=(4, 32)) * 10
    centres = np.repeat(supers, 2, axis=0) + rng.normal(size=(8, 32))
    labels = np.repeat(np.arange(8), 20)
    x = centres[labels] + 0.01 * rng.normal(size=(160, 32))
    ids = balanced_kmeans(x, 20, seed=0)
    sup = labels // 2
    for j in range(4):
        assert len(np.unique(sup[(ids == 2 * j) | (ids == 2 * j + 1)])) == 1


@pytest.mark.parametrize("kwargs, match", [
    ({"x": np.zeros(5), "cluster_size": 2}, "2-D"),
    ({"x": np.zeros((5, 2)), "cluster_size": 0}, "cluster_size must be"),
    ({"x": np.zeros((5, 2))}, "exactly one of"),
    ({"x": np.zeros((5, 2)), "cluster_size": 2, "num_clusters": 2}, "exactly one of"),
    ({"x": np.zeros((5, 2)), "num_clusters": 6}, "num_clusters must be"),
    ({"x": np.zeros((5, 2)), "cluster_size": 2, "niter": 0}, "niter must be"),
    ({"x": np.zeros((5, 2)), "cluster_size": 2, "device": "tpu"}, "device must be"),
    ({"x": np.array([[0.0, 1.0], [np.nan, 1.0]]), "cluster_size": 1}, "row 1"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        balanced_kmeans(**kwargs)
