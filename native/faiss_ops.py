"""FAISS wrappers: k-means and exact k-nearest-neighbour search, on the GPU when one is visible, else the CPU.

Used to cluster query embeddings for topic-aware batches ("Efficiently Teaching an Effective Dense Retriever
with Balanced Topic Aware Sampling", Hofstätter et al., SIGIR 2021) and to mine neighbours for NGAME-style
negatives. FAISS itself is "Billion-scale similarity search with GPUs" (Johnson, Douze and Jégou, 2017).

Every function takes a ``gpu`` argument: ``"auto"`` uses the GPU build of FAISS when it sees a GPU
(``faiss.get_num_gpus() > 0``), ``True`` requires one (a clear error otherwise), ``False`` stays on the CPU.
The results contract is the same on both: float32 centroids/distances, int64 assignments/indices.
"""

from __future__ import annotations

import contextlib

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["assign", "gpu_available", "kmeans", "knn", "knn_search"]

_METRICS = ("l2", "ip")


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss is a dependency
        raise ImportError("native.faiss_ops needs FAISS: pip install faiss-cpu (or faiss-gpu on CUDA)") from e
    return faiss


def gpu_available() -> bool:
    """True when the installed FAISS has GPU support and sees at least one GPU."""
    faiss = _faiss()
    if not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "get_num_gpus"):
        return False
    try:
        return faiss.get_num_gpus() > 0
    except Exception:  # pragma: no cover - a GPU build on a machine without a driver
        return False


def _resolve_gpu(gpu: bool | str) -> bool:
    if isinstance(gpu, str):
        if gpu != "auto":
            raise ValueError(f"gpu must be 'auto', True or False (got {gpu=})")
        return gpu_available()
    if not isinstance(gpu, (bool, np.bool_)):
        raise TypeError(f"gpu must be 'auto', True or False (got {type(gpu).__name__})")
    if gpu and not gpu_available():
        raise RuntimeError(
            "gpu=True but FAISS sees no GPU (faiss.get_num_gpus() == 0 or a CPU-only FAISS build); "
            "install faiss-gpu on a CUDA machine or pass gpu='auto' / gpu=False"
        )
    return bool(gpu)


@contextlib.contextmanager
def _omp_threads(faiss, num_threads: int | None):
    """Run FAISS's CPU code with ``num_threads`` OpenMP threads, restoring the previous count afterwards."""
    if num_threads is None:
        yield
        return
    if isinstance(num_threads, (bool, np.bool_)) or not isinstance(num_threads, (int, np.integer)) or num_threads < 1:
        raise ValueError(f"num_threads must be an integer >= 1 or None (got {num_threads=})")
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(num_threads))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _as_matrix(x: ArrayLike, name: str) -> NDArray[np.float32]:
    """Validate a [n, d] finite numeric matrix; returns float32, C-contiguous."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, d] (got shape {arr.shape})")
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a numeric array (got dtype {arr.dtype})")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name} must have at least one row and one column (got shape {arr.shape})")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(out)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        raise ValueError(
            f"{name} has NaN/inf values in row {int(bad_rows[0])} ({len(bad_rows)} rows in all); "
            "drop or fix those rows before clustering"
        )
    return out


def _check_int(value, name: str, lo: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo} (got {name}={value!r})")
    return int(value)


def kmeans(x: ArrayLike, k: int, *, niter: int = 20, seed: int = 0, gpu: bool | str = "auto",
           max_points_per_centroid: int = 256, nredo: int = 1,
           num_threads: int | None = None) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Lloyd's k-means with FAISS, then the nearest centroid of every point.

    Training subsamples to ``k * max_points_per_centroid`` points (FAISS's default behaviour, seeded by
    ``seed``); the returned assignment covers all ``n`` points. Empty clusters are re-seeded by FAISS by
    splitting large ones, so every centroid is a real centroid.

    Args:
        x: ``[n, d]`` numeric embeddings (converted to float32); every value must be finite.
        k: number of clusters, ``1 <= k <= n``.
        niter: Lloyd iterations, ``>= 1``.
        seed: integer seed of the initialisation and the subsample.
        gpu: ``"auto"`` (GPU when visible), ``True`` (require a GPU) or ``False`` (CPU).
        max_points_per_centroid: training subsample cap per centroid, ``>= 1``.
        nredo: independent runs (random initialisations); the one with the lowest objective is kept.
        num_threads: OpenMP threads for the CPU path (``None``: FAISS's default, all cores). On a machine shared
            with other busy processes, fewer threads can be much faster (OpenMP threads wait on each other).

    Returns:
        ``(centroids, assignment)``: float32 ``[k, d]`` and int64 ``[n]`` with values in ``[0, k)``.

    Raises:
        ValueError: bad shapes, NaN/inf values, ``k`` outside ``[1, n]``, bad options.
        RuntimeError: ``gpu=True`` without a visible GPU.
    """
    faiss = _faiss()
    xs = _as_matrix(x, "x")
    n, d = xs.shape
    k = _check_int(k, "k", 1)
    if k > n:
        raise ValueError(f"k must be <= the number of points n={n} (got {k=}); use fewer clusters")
    niter = _check_int(niter, "niter", 1)
    max_points_per_centroid = _check_int(max_points_per_centroid, "max_points_per_centroid", 1)
    nredo = _check_int(nredo, "nredo", 1)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)):
        raise TypeError(f"seed must be an int (got {type(seed).__name__})")
    use_gpu = _resolve_gpu(gpu)
    km = faiss.Kmeans(
        d,
        k,
        niter=niter,
        nredo=nredo,
        seed=int(seed) & 0x7FFFFFFF,  # FAISS stores the seed as a C int
        gpu=use_gpu,
        max_points_per_centroid=max_points_per_centroid,
        min_points_per_centroid=1,  # silence FAISS's "provide at least 39 points per centroid" warning
        verbose=False,
    )
    with _omp_threads(faiss, num_threads):
        km.train(xs)
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32).reshape(k, d)
    _, assignment = knn_search(centroids, 1, queries=xs, gpu=use_gpu, num_threads=num_threads)
    return centroids, assignment[:, 0].astype(np.int64, copy=False)


def knn_search(x: ArrayLike, k: int, *, queries: ArrayLike | None = None, gpu: bool | str = "auto",
               metric: str = "l2", num_threads: int | None = None) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Exact k-nearest neighbours of ``queries`` among the rows of ``x`` (a flat, brute-force index).

    Args:
        x: ``[n, d]`` base vectors (float32 after conversion), finite.
        k: neighbours per query, ``1 <= k <= n``.
        queries: ``[q, d]`` query vectors; ``None`` searches ``x`` against itself (each row is then usually
            its own first neighbour).
        gpu: ``"auto"``, ``True`` or ``False`` as in :func:`kmeans`.
        metric: ``"l2"`` (squared Euclidean distance, ascending) or ``"ip"`` (inner product, descending; use
            L2-normalised vectors for cosine similarity).
        num_threads: OpenMP threads for the CPU path, as in :func:`kmeans`.

    Returns:
        ``(distances, indices)``: float32 ``[q, k]`` and int64 ``[q, k]``, best first. Ties between equal
        distances are broken by FAISS (usually by lower index).

    Raises:
        ValueError: bad shapes, NaN/inf values, dimension mismatch, ``k`` outside ``[1, n]``, unknown metric.
        RuntimeError: ``gpu=True`` without a visible GPU.
    """
    faiss = _faiss()
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS} (got {metric=})")
    base = _as_matrix(x, "x")
    q = base if queries is None else _as_matrix(queries, "queries")
    n, d = base.shape
    if q.shape[1] != d:
        raise ValueError(f"queries have dimension {q.shape[1]} but x has dimension {d}; they must match")
    k = _check_int(k, "k", 1)
    if k > n:
        raise ValueError(f"k must be <= the number of base vectors n={n} (got {k=})")
    use_gpu = _resolve_gpu(gpu)
    index = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
    if use_gpu:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
    with _omp_threads(faiss, num_threads):
        index.add(base)
        dist, idx = index.search(q, k)
    return np.ascontiguousarray(dist, dtype=np.float32), np.ascontiguousarray(idx, dtype=np.int64)


def assign(x: ArrayLike, centroids: ArrayLike, *, gpu: bool | str = "auto") -> NDArray[np.int64]:
    """Nearest centroid (squared L2) of every row of ``x``.

    Args:
        x: ``[n, d]`` finite vectors.
        centroids: ``[k, d]`` finite centroids (from :func:`kmeans`).
        gpu: as in :func:`kmeans`.

    Returns:
        int64 ``[n]`` with values in ``[0, k)``.
    """
    _, idx = knn_search(centroids, 1, queries=x, gpu=gpu)
    return idx[:, 0]


def knn(queries: ArrayLike, base: ArrayLike, k: int, *, gpu: bool | str = "auto",
        metric: str = "l2") -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """:func:`knn_search` with the queries first: ``knn(queries, base, k)``."""
    return knn_search(base, k, queries=queries, gpu=gpu, metric=metric)
