"""Ragged (list-column) kernels: gather rows of an Arrow ``list<int32>`` column straight from its offsets and
values buffers, and lay a batch out padded ``[B, L]`` or packed ``[T]`` with ``cu_seqlens``.

A batch of rows is one pass over the offsets and values buffers (NumPy views of the memory-mapped IPC file):
no per-row Python and no ``ChunkedArray.take`` (which concatenates chunks first).
"""

from __future__ import annotations

import numba
import numpy as np
from numpy.typing import NDArray

from native._config import njit


@njit
def _gather_lengths(offsets, rows, pos, out_lengths):
    for i in range(rows.shape[0]):
        r = rows[i]
        out_lengths[pos[i]] = offsets[r + 1] - offsets[r]


@njit(inline="always")
def _gather_row(offsets, values, rows, pos, out_offsets, out_values, i):
    r = rows[i]
    a = offsets[r]
    n = offsets[r + 1] - a
    o = out_offsets[pos[i]]
    for j in range(n):
        out_values[o + j] = values[a + j]


@njit
def _gather_values(offsets, values, rows, pos, out_offsets, out_values):
    for i in range(rows.shape[0]):
        _gather_row(offsets, values, rows, pos, out_offsets, out_values, i)


@njit(parallel=True)
def _gather_values_parallel(offsets, values, rows, pos, out_offsets, out_values):
    for i in numba.prange(rows.shape[0]):
        _gather_row(offsets, values, rows, pos, out_offsets, out_values, i)


def gather_lengths(offsets: NDArray, rows: NDArray[np.int64], pos: NDArray[np.int64], out_lengths: NDArray[np.int64]) -> None:
    """``out_lengths[pos[i]] = offsets[rows[i]+1] - offsets[rows[i]]`` (in place; one shard of a batch)."""
    _gather_lengths(offsets, rows, pos, out_lengths)


def gather_values(offsets: NDArray, values: NDArray, rows: NDArray[np.int64], pos: NDArray[np.int64],
                  out_offsets: NDArray[np.int64], out_values: NDArray, parallel: bool = False) -> None:
    """Copy row ``rows[i]`` of a ragged column to ``out_values[out_offsets[pos[i]]:...]`` (in place).

    ``parallel`` splits rows over Numba's threads (rows are disjoint: same result for any thread count)."""
    kernel = _gather_values_parallel if parallel and len(rows) > 64 else _gather_values
    kernel(offsets, values, rows, pos, out_offsets, out_values)


def gather_ragged(values: NDArray, offsets: NDArray, rows: NDArray, *, parallel: bool = False
                  ) -> tuple[NDArray, NDArray[np.int64]]:
    """Gather rows of one ragged column.

    Args:
        values: flat values ``[V]``.
        offsets: int32/int64 offsets ``[R+1]`` into ``values``.
        rows: int64 rows to take, in output order.
        parallel: split rows over Numba's threads.

    Returns:
        ``(out_values [sum of lengths], out_offsets int64 [len(rows)+1])``.
    """
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    nrows = len(offsets) - 1
    if len(rows) and (rows.min() < 0 or rows.max() >= nrows):
        raise IndexError(f"rows must be in [0, {nrows}) (got min {rows.min()}, max {rows.max()})")
    pos = np.arange(len(rows), dtype=np.int64)
    lengths = np.empty(len(rows), dtype=np.int64)
    _gather_lengths(offsets, rows, pos, lengths)
    out_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out_offsets[1:])
    out_values = np.empty(out_offsets[-1], dtype=values.dtype)
    gather_values(offsets, values, rows, pos, out_offsets, out_values, parallel=parallel)
    return out_values, out_offsets


@njit(inline="always")
def _pad_row(values, offsets, width, pad_id, label_pad, out_ids, out_mask, out_labels, b):
    a = offsets[b]
    n = offsets[b + 1] - a
    if n > width:
        n = width
    for j in range(n):
        v = values[a + j]
        out_ids[b, j] = v
        out_mask[b, j] = 1
        out_labels[b, j] = v
    for j in range(n, width):
        out_ids[b, j] = pad_id
        out_mask[b, j] = 0
        out_labels[b, j] = label_pad


@njit
def _pad(values, offsets, width, pad_id, label_pad, out_ids, out_mask, out_labels):
    for b in range(offsets.shape[0] - 1):
        _pad_row(values, offsets, width, pad_id, label_pad, out_ids, out_mask, out_labels, b)


@njit(parallel=True)
def _pad_parallel(values, offsets, width, pad_id, label_pad, out_ids, out_mask, out_labels):
    # rows are independent and only copied: the result is the same for any thread count
    for b in numba.prange(offsets.shape[0] - 1):
        _pad_row(values, offsets, width, pad_id, label_pad, out_ids, out_mask, out_labels, b)


def pad_ragged(values: NDArray, offsets: NDArray, *, pad_id: int = 0, width: int | None = None,
               pad_to_multiple_of: int | None = None, label_pad: int = -100, alloc=np.empty,
               parallel: bool = False) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Lay a ragged batch out as a right-padded matrix.

    Args:
        values: flat token ids ``[T]``; offsets: ``[B+1]``.
        pad_id: id written into padding; label_pad: label written into padding.
        width: fixed width (rows longer are truncated); default the longest row.
        pad_to_multiple_of: round the width up to a multiple of this.
        alloc: ``alloc(shape, dtype) -> array`` for the outputs (e.g. views of shared-memory tensors, so a
            DataLoader worker's batch crosses to the main process without another copy).
        parallel: split rows over Numba's threads (the padded output's memory traffic dominates; use it in the
            main process, not inside DataLoader workers, which already run in parallel).

    Returns:
        ``(input_ids int64 [B, L], attention_mask int64 [B, L], labels int64 [B, L])``.
    """
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    L = int(lengths.max()) if width is None and len(lengths) else int(width or 0)
    if pad_to_multiple_of:
        L = -(-L // pad_to_multiple_of) * pad_to_multiple_of
    B = len(lengths)
    ids = alloc((B, L), np.int64)
    mask = alloc((B, L), np.int64)
    labels = alloc((B, L), np.int64)
    (_pad_parallel if parallel and B > 1 else _pad)(values, offsets, L, pad_id, label_pad, ids, mask, labels)
    return ids, mask, labels


@njit(inline="always")
def _pack_row(values, offsets, label_pad, out_ids, out_pos, out_labels, b):
    a = offsets[b]
    n = offsets[b + 1] - a
    for j in range(n):
        v = values[a + j]
        out_ids[a + j] = v
        out_pos[a + j] = j
        out_labels[a + j] = label_pad if j == 0 else v


@njit
def _pack(values, offsets, label_pad, out_ids, out_pos, out_labels):
    for b in range(offsets.shape[0] - 1):
        _pack_row(values, offsets, label_pad, out_ids, out_pos, out_labels, b)


@njit(parallel=True)
def _pack_parallel(values, offsets, label_pad, out_ids, out_pos, out_labels):
    for b in numba.prange(offsets.shape[0] - 1):
        _pack_row(values, offsets, label_pad, out_ids, out_pos, out_labels, b)


def pack_ragged(values: NDArray, offsets: NDArray, *, label_pad: int = -100, alloc=np.empty,
                parallel: bool = False) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Padding-free layout of a ragged batch (flash-attention varlen / HF ``DataCollatorWithFlattening`` style).

    Args:
        values: flat token ids ``[T]`` (rows back to back); offsets: ``[B+1]`` starting at 0.
        alloc: ``alloc(shape, dtype) -> array`` for the outputs (see :func:`pad_ragged`).
        parallel: split rows over Numba's threads (see :func:`pad_ragged`).

    Returns:
        ``(input_ids int64 [T], position_ids int64 [T], labels int64 [T])``; labels are the ids with
        ``label_pad`` at the first token of each sequence, so no sequence learns from its neighbour.
    """
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    if len(offsets) and offsets[0] != 0:
        values = values[offsets[0] : offsets[-1]]
        offsets = offsets - offsets[0]
    T = int(offsets[-1]) if len(offsets) else 0
    ids = alloc(T, np.int64)
    pos = alloc(T, np.int64)
    labels = alloc(T, np.int64)
    (_pack_parallel if parallel and len(offsets) > 65 else _pack)(values, offsets, label_pad, ids, pos, labels)
    return ids, pos, labels
