"""Kernels of the windowed NGAME plan: clusters laid out window by window, found arithmetically.

A windowed clustering (``samplers.ngame_windowed``) splits ``n`` rows into ``W`` windows of sizes
``wsizes[w]`` (starting at ``wstart[w]`` of the "rows by cluster" file) and clusters window ``w`` into
``kcum[w + 1] - kcum[w]`` balanced clusters whose sizes are ``native.balanced.leaf_sizes(wsizes[w], K_w)``:
``q`` or ``q + 1`` rows, the larger first. Cluster ``c`` (a global id, windows in order) therefore lies at
``wstart[w] + j * q + min(j, r)`` with ``j = c - kcum[w]``, ``q, r = divmod(wsizes[w], K_w)``: no per-row or
per-cluster array is needed, O(windows) in all.

A clustered epoch takes the clusters in a seeded Feistel order (``native.feistel``), ``per`` per batch.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from native._config import njit
from native.feistel import feistel_keyed, half_bits, round_keys

__all__ = ["cluster_batch_sizes", "cluster_span", "clusters_rows", "scatter_cells"]


@njit(inline="always")
def _span(c: np.int64, wstart: np.ndarray, kcum: np.ndarray) -> tuple[np.int64, np.int64]:
    """(first file position, size) of global cluster ``c``."""
    w = np.searchsorted(kcum, c, side="right") - 1
    j = c - kcum[w]
    k = kcum[w + 1] - kcum[w]
    m = wstart[w + 1] - wstart[w]
    q = m // k
    r = m - q * k
    return wstart[w] + j * q + min(j, r), q + (1 if j < r else 0)


@njit
def _cluster_batch_sizes(num_batches: np.int64, per: np.int64, num_clusters: np.int64, seed: np.uint64,
                         wstart: np.ndarray, kcum: np.ndarray) -> np.ndarray:
    out = np.zeros(num_batches, dtype=np.int64)
    h = half_bits(num_clusters) if num_clusters > 1 else np.int64(1)
    keys = round_keys(seed)
    for b in range(num_batches):
        total = np.int64(0)
        for i in range(b * per, min((b + 1) * per, num_clusters)):
            c = feistel_keyed(i, num_clusters, h, keys) if num_clusters > 1 else np.int64(0)
            total += _span(c, wstart, kcum)[1]
        out[b] = total
    return out


def _check_layout(wstart: NDArray, kcum: NDArray) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    ws = np.ascontiguousarray(wstart, dtype=np.int64)
    kc = np.ascontiguousarray(kcum, dtype=np.int64)
    if ws.ndim != 1 or ws.shape != kc.shape or len(ws) < 2:
        raise ValueError(f"wstart and kcum must be 1-D of one length >= 2 (got {ws.shape}, {kc.shape})")
    if (np.diff(kc) < 1).any() or (np.diff(ws) < np.diff(kc)).any():
        raise ValueError("every window needs >= 1 cluster and >= 1 row per cluster (kcum and wstart must rise, "
                         "wstart at least as fast)")
    return ws, kc


def cluster_batch_sizes(num_batches: int, per: int, seed: int, wstart: NDArray[np.int64],
                        kcum: NDArray[np.int64]) -> NDArray[np.int64]:
    """Rows of each batch when batch ``b`` holds clusters at positions ``[b * per, (b + 1) * per)`` of the seeded
    Feistel permutation of the ``kcum[-1]`` clusters.

    Args:
        num_batches: batches to size (``<= ceil(K / per)``; fewer drops the clusters of the last ones).
        per: clusters per batch, ``>= 1``.
        seed: the permutation's seed (taken modulo 2**64).
        wstart: int64 ``[W + 1]`` first file position of each window, then ``n``.
        kcum: int64 ``[W + 1]`` first global cluster id of each window, then ``K``.

    Returns:
        int64 ``[num_batches]`` rows per batch.
    """
    ws, kc = _check_layout(wstart, kcum)
    K = int(kc[-1])
    if per < 1 or not 0 <= num_batches <= -(-K // per):
        raise ValueError(f"need per >= 1 and 0 <= num_batches <= ceil(K / per) (got {per=}, {num_batches=}, {K=})")
    return _cluster_batch_sizes(np.int64(num_batches), np.int64(per), np.int64(K),
                                np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF), ws, kc)


@njit
def _clusters_rows(rows_file: np.ndarray, first: np.int64, count: np.int64, num_clusters: np.int64,
                   seed: np.uint64, wstart: np.ndarray, kcum: np.ndarray) -> np.ndarray:
    h = half_bits(num_clusters) if num_clusters > 1 else np.int64(1)
    keys = round_keys(seed)
    total = np.int64(0)
    for i in range(first, first + count):
        c = feistel_keyed(i, num_clusters, h, keys) if num_clusters > 1 else np.int64(0)
        total += _span(c, wstart, kcum)[1]
    out = np.empty(total, dtype=np.int64)
    at = 0
    for i in range(first, first + count):
        c = feistel_keyed(i, num_clusters, h, keys) if num_clusters > 1 else np.int64(0)
        s0, size = _span(c, wstart, kcum)
        for k in range(size):
            out[at + k] = rows_file[s0 + k]
        at += size
    return out


def clusters_rows(rows_file: NDArray, first: int, count: int, seed: int, wstart: NDArray[np.int64],
                  kcum: NDArray[np.int64]) -> NDArray[np.int64]:
    """Rows of the clusters at positions ``[first, first + count)`` of the seeded Feistel permutation of the
    clusters, each cluster's rows in file order, read from ``rows_file`` (a memory map: only those slices).

    Args:
        rows_file: int32/int64 ``[n]`` rows by cluster, window after window.
        first, count: permutation positions, ``0 <= first <= first + count <= K``.
        seed, wstart, kcum: as in :func:`cluster_batch_sizes`.

    Returns:
        int64 rows, cluster after cluster.
    """
    ws, kc = _check_layout(wstart, kcum)
    K = int(kc[-1])
    if not 0 <= first <= first + count <= K:
        raise ValueError(f"need 0 <= first <= first + count <= K (got {first=}, {count=}, {K=})")
    if len(rows_file) != ws[-1]:
        raise ValueError(f"rows_file has {len(rows_file)} entries but the layout covers {int(ws[-1])} rows")
    return _clusters_rows(np.asarray(rows_file).view(type=np.ndarray), np.int64(first), np.int64(count),
                          np.int64(K), np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF), ws, kc)


def cluster_span(c: int, wstart: NDArray[np.int64], kcum: NDArray[np.int64]) -> tuple[int, int]:
    """``(first file position, size)`` of global cluster ``c`` (a plain-Python reference of the kernels' rule)."""
    w = int(np.searchsorted(kcum, c, side="right")) - 1
    j, k, m = c - int(kcum[w]), int(kcum[w + 1] - kcum[w]), int(wstart[w + 1] - wstart[w])
    q, r = divmod(m, k)
    return int(wstart[w]) + j * q + min(j, r), q + (1 if j < r else 0)


@njit
def _assign_scatter(cells: np.ndarray, base: np.int64, cursor: np.ndarray, out: np.ndarray) -> None:
    for i in range(cells.shape[0]):
        c = cells[i]
        out[cursor[c]] = base + i
        cursor[c] += 1


def scatter_cells(cells: NDArray, base: int, cursor: NDArray[np.int64], out: NDArray) -> None:
    """Counting sort's second pass: row ``base + i`` goes to ``out[cursor[cells[i]]]`` (then that cursor moves on).

    Args:
        cells: int ``[k]`` the cell of rows ``base .. base + k - 1``, each in ``[0, len(cursor))``.
        base: the first row.
        cursor: int64 ``[C]`` next free position of each cell in ``out`` (advanced in place).
        out: int32/int64 ``[n]`` rows by cell (a writable memory map).
    """
    cur = np.asarray(cursor)
    if cur.dtype != np.int64 or not cur.flags.c_contiguous:
        raise ValueError("cursor must be a contiguous int64 array (it is advanced in place)")
    c = np.ascontiguousarray(cells, dtype=np.int64)
    if len(c) and (c.min() < 0 or c.max() >= len(cur)):
        raise ValueError(f"cells must lie in [0, {len(cur)}) (got min {c.min()}, max {c.max()})")
    _assign_scatter(c, np.int64(base), cur, np.asarray(out))
