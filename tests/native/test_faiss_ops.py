"""FAISS wrappers: k-means against a NumPy Lloyd reference, exact KNN against brute force, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import native
from native.faiss_ops import assign, gpu_available, knn


def lloyd_reference(x: np.ndarray, k: int, *, niter: int = 30, restarts: int = 5, seed: int = 0):
    """Plain NumPy Lloyd's k-means, best of a few random restarts: (centroids, assignment, inertia)."""
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(restarts):
        c = x[rng.choice(len(x), k, replace=False)].astype(np.float64)
        for _ in range(niter):
            d = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
            a = d.argmin(1)
            for j in range(k):
                if np.any(a == j):
                    c[j] = x[a == j].mean(0)
        d = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
        a = d.argmin(1)
        inertia = float(d[np.arange(len(x)), a].sum())
        if best is None or inertia < best[2]:
            best = (c, a, inertia)
    return best


def inertia(x, centroids, assignment):
    return float(((x - centroids[assignment]) ** 2).sum())


def blobs(n_per: int, k: int, d: int, seed: int, spread: float = 0.05):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 3
    labels = np.repeat(np.arange(k), n_per)
    x = centers[labels] + spread * rng.normal(size=(len(labels), d))
    return x.astype(np.float32), labels


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_kmeans_contract_and_blobs_recovered(k):
    x, labels = blobs(40, k, 8, seed=k)
    c, a = native.kmeans(x, k, seed=1, gpu=False, nredo=10)
    assert c.shape == (k, 8) and c.dtype == np.float32
    assert a.shape == (len(x),) and a.dtype == np.int64
    assert a.min() >= 0 and a.max() < k
    # every point sits with its nearest centroid
    d = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(a, d.argmin(1))
    # well separated blobs: the same partition as the truth (with restarts, as Lloyd's can stall in a local optimum)
    assert same_partition(a, labels)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_quality_matches_numpy_lloyd(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, 6)).astype(np.float32)  # no cluster structure: a hard case for quality
    c, a = native.kmeans(x, 8, niter=30, seed=seed, gpu=False)
    _, _, ref = lloyd_reference(x.astype(np.float64), 8, seed=seed)
    got = inertia(x.astype(np.float64), c.astype(np.float64), a)
    assert got <= ref * 1.05, f"FAISS inertia {got:.2f} vs NumPy Lloyd {ref:.2f}"


def test_kmeans_deterministic_and_seed_matters():
    x = np.random.default_rng(3).normal(size=(500, 4)).astype(np.float32)
    c1, a1 = native.kmeans(x, 6, seed=7, gpu=False)
    c2, a2 = native.kmeans(x, 6, seed=7, gpu=False)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(c1, c2)
    c3, _ = native.kmeans(x, 6, seed=8, gpu=False)
    assert not np.array_equal(c1, c3)


def test_kmeans_k_equals_n_and_float64_input():
    x = np.arange(12, dtype=np.float64).reshape(6, 2)
    c, a = native.kmeans(x, 6, gpu=False)
    assert sorted(a.tolist()) == list(range(6))
    assert c.dtype == np.float32


def test_kmeans_subsampling_still_assigns_every_point():
    x, _ = blobs(200, 4, 5, seed=4)
    c, a = native.kmeans(x, 4, max_points_per_centroid=10, gpu=False)
    assert a.shape == (800,)
    np.testing.assert_array_equal(a, assign(x, c, gpu=False))


@pytest.mark.parametrize(
    "x, k, kw, exc, match",
    [
        (np.zeros((5, 3)), 6, {}, ValueError, r"k must be <= the number of points n=5"),
        (np.zeros((5, 3)), 0, {}, ValueError, r"k must be an integer >= 1"),
        (np.zeros(5), 2, {}, ValueError, r"x must be a 2-D array"),
        (np.zeros((0, 3)), 1, {}, ValueError, r"at least one row"),
        (np.array([[0.0, 1.0], [np.nan, 2.0], [3.0, 4.0]]), 2, {}, ValueError, r"NaN/inf values in row 1"),
        (np.array([[0.0, 1.0], [np.inf, 2.0], [3.0, 4.0]]), 2, {}, ValueError, r"NaN/inf"),
        (np.array([["a", "b"]]), 1, {}, TypeError, r"numeric"),
        (np.zeros((5, 3)), 2, {"niter": 0}, ValueError, r"niter must be an integer >= 1"),
        (np.zeros((5, 3)), 2, {"gpu": "cuda"}, ValueError, r"gpu must be 'auto', True or False"),
        (np.zeros((5, 3)), 2, {"max_points_per_centroid": 0}, ValueError, r"max_points_per_centroid"),
    ],
)
def test_kmeans_bad_input(x, k, kw, exc, match):
    with pytest.raises(exc, match=match):
        native.kmeans(x, k, **kw)


@pytest.mark.skipif(gpu_available(), reason="a GPU is visible: gpu=True is valid here")
def test_gpu_true_without_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="gpu=True but FAISS sees no GPU"):
        native.kmeans(np.zeros((4, 2), np.float32), 2, gpu=True)
    with pytest.raises(RuntimeError, match="no GPU"):
        native.knn_search(np.zeros((4, 2), np.float32), 1, gpu=True)


def test_gpu_auto_matches_cpu():
    x = np.random.default_rng(5).normal(size=(400, 8)).astype(np.float32)
    _, i_auto = native.knn_search(x, 5, gpu="auto")
    _, i_cpu = native.knn_search(x, 5, gpu=False)
    np.testing.assert_array_equal(i_auto[:, 0], i_cpu[:, 0])


def brute_knn(base, queries, k, metric):
    if metric == "l2":
        d = ((queries[:, None, :].astype(np.float64) - base[None].astype(np.float64)) ** 2).sum(-1)
        idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    else:
        d = queries.astype(np.float64) @ base.T.astype(np.float64)
        idx = np.argsort(-d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, 1), idx


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 60), q=st.integers(1, 20), d=st.integers(1, 8), k=st.integers(1, 5),
       metric=st.sampled_from(["l2", "ip"]), seed=st.integers(0, 2**31 - 1))
def test_knn_search_agrees_with_brute_force(n, q, d, k, metric, seed):
    k = min(k, n)
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, d)).astype(np.float32)
    queries = rng.normal(size=(q, d)).astype(np.float32)
    dist, idx = native.knn_search(base, k, queries=queries, metric=metric, gpu=False)
    assert dist.dtype == np.float32 and idx.dtype == np.int64 and idx.shape == (q, k)
    ref_d, _ = brute_knn(base, queries, k, metric)
    # distances agree (ties may order indices differently); the indices reach those distances
    np.testing.assert_allclose(dist, ref_d, rtol=1e-4, atol=1e-4)
    q64, b64 = queries.astype(np.float64), base[idx].astype(np.float64)
    d_of_idx = ((q64[:, None, :] - b64) ** 2).sum(-1) if metric == "l2" else np.einsum("qd,qkd->qk", q64, b64)
    np.testing.assert_allclose(d_of_idx, ref_d, rtol=1e-4, atol=1e-4)


def test_knn_search_self_and_knn_alias():
    x = np.random.default_rng(6).normal(size=(100, 4)).astype(np.float32)
    dist, idx = native.knn_search(x, 3)
    np.testing.assert_array_equal(idx[:, 0], np.arange(100))
    np.testing.assert_allclose(dist[:, 0], 0, atol=1e-5)
    d2, i2 = knn(x[:10], x, 3)
    np.testing.assert_array_equal(i2, idx[:10])


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"k": 11}, r"k must be <= the number of base vectors n=10"),
        ({"k": 2, "metric": "cosine"}, r"metric must be one of"),
        ({"k": 2, "queries": np.zeros((3, 5))}, r"queries have dimension 5 but x has dimension 4"),
        ({"k": 2, "queries": np.full((3, 4), np.nan)}, r"queries has NaN/inf values in row 0"),
    ],
)
def test_knn_search_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        native.knn_search(np.zeros((10, 4), np.float32), **kw)


@pytest.mark.parametrize("seed", [0, 1])
def test_kmeans_on_blobs_as_good_as_numpy_lloyd(seed):
    x, _ = blobs(30, 9, 8, seed=seed, spread=0.3)
    c, a = native.kmeans(x, 9, niter=30, seed=seed, nredo=5, gpu=False)
    _, _, ref = lloyd_reference(x.astype(np.float64), 9, restarts=5, seed=seed)
    assert inertia(x.astype(np.float64), c.astype(np.float64), a) <= ref * 1.05


def test_num_threads_gives_the_same_result_and_restores_the_setting():
    import faiss

    before = faiss.omp_get_max_threads()
    x = np.random.default_rng(8).normal(size=(300, 5)).astype(np.float32)
    c1, a1 = native.kmeans(x, 4, seed=2, gpu=False, num_threads=1)
    c2, a2 = native.kmeans(x, 4, seed=2, gpu=False)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_allclose(c1, c2, rtol=1e-5, atol=1e-5)
    assert faiss.omp_get_max_threads() == before
    with pytest.raises(ValueError, match="num_threads must be an integer >= 1"):
        native.knn_search(x, 2, num_threads=0)
