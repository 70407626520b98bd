"""Kernels of the windowed topic-aware plan: a counting sort of rows by cluster, and rows of clusters' permutations.

``samplers.TopicAwareBatchSampler`` (TAS, Hofstätter et al., "Efficiently Teaching an Effective Dense Retriever
with Balanced Topic Aware Sampling", SIGIR 2021) needs the rows of each cluster in a fresh random order every
epoch. At 1e9 rows an in-RAM argsort by cluster is out of reach, so the rows are sorted by a *counting sort* read
in chunks (:func:`scan_ids`, :func:`count_ids`, then :func:`scatter_rows` into a memory-mapped output), and a
cluster's order each epoch is a stateless Feistel permutation of its range (:func:`cluster_rows`): position ``k``
of cluster ``c`` is ``rows[offsets[c] + feistel(k, size_c, seed_c)]``, computed on its own.

With a pair table (TAS-Balanced), queries without pairs are left out of the sort: :func:`count_kept_ids` and
:func:`scatter_kept_rows` read the pair table's CSR offsets alongside the ids (row ``i`` is kept when
``offsets[i + 1] > offsets[i]``), so no per-query mask is ever held in memory.

Kernels take arrays and scalars and return arrays; the checks live in ``samplers.topic_windowed``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from native._config import njit
from native.feistel import feistel_keyed, half_bits, round_keys
from native.rng import MASK63, mix_step

__all__ = ["cluster_rows", "count_ids", "count_kept_ids", "scan_ids", "scatter_kept_rows", "scatter_rows"]


@njit
def _scan_ids(ids: np.ndarray, prev: np.int64) -> tuple:
    first_neg = np.int64(-1)
    lo = np.int64(0)
    hi = np.int64(-1)
    ordered = True
    last = prev
    for i in range(ids.shape[0]):
        v = np.int64(ids[i])
        if v < 0 and first_neg < 0:
            first_neg = i
        if i == 0 or v < lo:
            lo = v
        hi = max(hi, v)
        if v < last:
            ordered = False
        last = v
    return first_neg, lo, hi, ordered


def scan_ids(ids: NDArray, prev: int = -(1 << 62)) -> tuple[int, int, int, bool]:
    """One chunk of cluster ids: ``(first negative row or -1, min, max, non-decreasing from prev)``.

    Args:
        ids: 1-D integer array (any integer dtype; a memory-mapped chunk is read in place).
        prev: the last id of the previous chunk (the order check continues across chunks).
    """
    a = np.asarray(ids)
    if len(a) == 0:
        return -1, 0, -1, True
    neg, lo, hi, ordered = _scan_ids(a, np.int64(prev))
    return int(neg), int(lo), int(hi), bool(ordered)


@njit
def _count_ids(ids: np.ndarray, counts: np.ndarray) -> None:
    for i in range(ids.shape[0]):
        counts[ids[i]] += 1


def count_ids(ids: NDArray, counts: NDArray[np.int64]) -> None:
    """Add the rows of each id of a chunk to ``counts`` (int64 ``[>= max(ids) + 1]``), in place. Ids must be
    ``>= 0`` and below ``len(counts)`` (checked by :func:`scan_ids` first)."""
    _count_ids(np.asarray(ids), counts)


@njit
def _scatter_rows(ids: np.ndarray, first_row: np.int64, dense: np.ndarray, cursor: np.ndarray,
                  out: np.ndarray) -> None:
    for i in range(ids.shape[0]):
        c = dense[ids[i]]
        out[cursor[c]] = first_row + i
        cursor[c] += 1


def scatter_rows(ids: NDArray, first_row: int, dense: NDArray[np.int64], cursor: NDArray[np.int64],
                 out: NDArray) -> None:
    """The second pass of the counting sort: row ``first_row + i`` goes to ``out[cursor[dense[ids[i]]]]`` and that
    cursor moves on (rows of a cluster stay in row order: the sort is stable).

    Args:
        ids: a chunk of cluster ids (rows ``first_row ...``).
        first_row: the row of ``ids[0]``.
        dense: int64 ``[max id + 1]``: the dense cluster index of each id.
        cursor: int64 ``[K]``: next free slot of each dense cluster in ``out`` (updated in place).
        out: int32/int64 ``[N]`` rows by cluster (a memory map).
    """
    _scatter_rows(np.asarray(ids), np.int64(first_row), dense, cursor, out)


@njit
def _count_kept_ids(ids: np.ndarray, offsets: np.ndarray, counts: np.ndarray) -> np.int64:
    kept = np.int64(0)
    for i in range(ids.shape[0]):
        if offsets[i + 1] > offsets[i]:
            counts[ids[i]] += 1
            kept += 1
    return kept


def count_kept_ids(ids: NDArray, offsets: NDArray[np.int64], counts: NDArray[np.int64]) -> int:
    """:func:`count_ids` over the rows that have pairs: row ``i`` of the chunk counts when
    ``offsets[i + 1] > offsets[i]``.

    Args:
        ids: a chunk of cluster ids (``>= 0``, below ``len(counts)``).
        offsets: int64 ``[len(ids) + 1]``: the pair table's CSR offsets of the chunk's rows and the next one.
        counts: int64 counters per id, updated in place.

    Returns:
        rows of the chunk that were counted.
    """
    if len(offsets) != len(ids) + 1:
        raise ValueError(f"offsets must hold len(ids) + 1 = {len(ids) + 1} values (got {len(offsets)})")
    return int(_count_kept_ids(np.asarray(ids), np.asarray(offsets), counts))


@njit
def _scatter_kept_rows(ids: np.ndarray, offsets: np.ndarray, first_row: np.int64, dense: np.ndarray,
                       cursor: np.ndarray, out: np.ndarray) -> None:
    for i in range(ids.shape[0]):
        if offsets[i + 1] > offsets[i]:
            c = dense[ids[i]]
            out[cursor[c]] = first_row + i
            cursor[c] += 1


def scatter_kept_rows(ids: NDArray, offsets: NDArray[np.int64], first_row: int, dense: NDArray[np.int64],
                      cursor: NDArray[np.int64], out: NDArray) -> None:
    """:func:`scatter_rows` over the rows that have pairs (``offsets`` as in :func:`count_kept_ids`)."""
    if len(offsets) != len(ids) + 1:
        raise ValueError(f"offsets must hold len(ids) + 1 = {len(ids) + 1} values (got {len(offsets)})")
    _scatter_kept_rows(np.asarray(ids), np.asarray(offsets), np.int64(first_row), dense, cursor, out)


@njit
def _cluster_rows(rows: np.ndarray, identity: bool, seg_cluster: np.ndarray, seg_start: np.ndarray,
                  seg_len: np.ndarray, offsets: np.ndarray, prefix: np.uint64) -> np.ndarray:
    total = 0
    for s in range(seg_len.shape[0]):
        total += seg_len[s]
    out = np.empty(total, dtype=np.int64)
    k = 0
    for s in range(seg_len.shape[0]):
        c = seg_cluster[s]
        base = offsets[c]
        n = offsets[c + 1] - base
        keys = round_keys(mix_step(prefix, np.uint64(c)) & MASK63)
        h = half_bits(n)
        for j in range(seg_start[s], seg_start[s] + seg_len[s]):
            p = feistel_keyed(j, n, h, keys) if n > 1 else np.int64(0)
            out[k] = base + p if identity else np.int64(rows[base + p])
            k += 1
    return out


def cluster_rows(rows: NDArray | None, seg_cluster: NDArray, seg_start: NDArray[np.int64],
                 seg_len: NDArray[np.int64], offsets: NDArray[np.int64], prefix: int) -> NDArray[np.int64]:
    """Rows at positions ``[seg_start[s], seg_start[s] + seg_len[s])`` of cluster ``seg_cluster[s]``'s permuted
    order, segment after segment.

    Cluster ``c``'s order is ``feistel_permute(arange(size_c), size_c, mix_seed(*parts, c))`` over its slice
    ``rows[offsets[c]:offsets[c+1]]``, where ``prefix = mix_prefix(*parts)``.

    Args:
        rows: int32/int64 ``[N]`` rows sorted by cluster (a memory map), or None when row ``offsets[c] + k`` is
            the ``k``-th row of cluster ``c`` (cluster ids already sorted).
        seg_cluster: int ``[S]`` dense cluster of each segment.
        seg_start, seg_len: int64 ``[S]`` positions in the cluster's order (within ``[0, size_c]``).
        offsets: int64 ``[K + 1]`` cluster boundaries in ``rows``.
        prefix: ``native.rng.mix_prefix`` of the epoch's parts.

    Returns:
        int64 ``[sum(seg_len)]``.
    """
    identity = rows is None
    r = np.zeros(1, dtype=np.int32) if identity else np.asarray(rows)
    return _cluster_rows(r, identity, np.ascontiguousarray(seg_cluster, dtype=np.int64),
                         np.ascontiguousarray(seg_start, dtype=np.int64), np.ascontiguousarray(seg_len, dtype=np.int64),
                         np.ascontiguousarray(offsets, dtype=np.int64), np.uint64(int(prefix) & 0xFFFFFFFFFFFFFFFF))
