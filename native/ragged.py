"""Ragged (list-column) kernels: gather rows of an Arrow ``list<int32>`` column straight from its offsets and
values buffers, and lay a batch out padded ``[B, L]`` or packed ``[T]`` with ``cu_seqlens``.

A batch of rows is one pass over the offsets and values buffers (NumPy views of the memory-mapped IPC file):
no per-row Python and no ``ChunkedArray.take`` (which concatenates chunks first). The layouts are written from the
source buffers directly (``pad_rows``; ``gather_values`` then ``pack_layout``), with any integer output dtype.
Every kernel is ``nogil`` (see ``native/_config.py``), so threads can build batches side by side.
"""

from __future__ import annotations

import numba
import numpy as np
from numpy.typing import NDArray

from native._config import njit
from native.prefetch import AHEAD, prefetch_row


@njit
def _gather_lengths(offsets, rows, pos, out_lengths):
    for i in range(rows.shape[0]):
        r = rows[i]
        out_lengths[pos[i]] = offsets[r + 1] - offsets[r]


@njit
def _locate_rows(starts, idx, shard, local):
    n = starts[starts.shape[0] - 1]
    single = True
    for i in range(idx.shape[0]):
        r = idx[i]
        if r < 0:
            r += n
        if r < 0 or r >= n:
            return i, False
        s = np.searchsorted(starts, r, side="right") - 1
        shard[i] = s
        local[i] = r - starts[s]
        if s != shard[0]:
            single = False
    return -1, single


def locate_rows(starts: NDArray[np.int64], idx: NDArray[np.int64], shard: NDArray[np.int64],
                local: NDArray[np.int64]) -> tuple[int, bool]:
    """Shard and row within the shard of each dataset row ``idx[i]`` (negative rows count from the end), in place.

    Args:
        starts: int64 ``[S+1]`` first dataset row of each shard, then the row count (empty shards repeat a start).
        idx: int64 ``[B]`` dataset rows.
        shard, local: int64 ``[B]`` outputs.

    Returns:
        ``(bad, single)``: the position in ``idx`` of the first row out of range (``-1`` when none; the outputs
        are then incomplete), and whether every row is in one shard.
    """
    bad, single = _locate_rows(starts, idx, shard, local)
    return int(bad), bool(single)


@njit
def _row_offsets(offsets, rows, out):
    out[0] = 0
    for i in range(rows.shape[0]):
        r = rows[i]
        out[i + 1] = out[i] + offsets[r + 1] - offsets[r]


def row_offsets(offsets: NDArray, rows: NDArray[np.int64], out: NDArray[np.int64]) -> None:
    """``out`` (int64 ``[len(rows)+1]``): offsets of rows ``rows`` of a ragged column laid back to back (in place)."""
    _row_offsets(offsets, rows, out)


@njit(inline="always")
def _gather_row(offsets, values, rows, pos, out_offsets, out_values, i):
    r = rows[i]
    a = offsets[r]
    n = offsets[r + 1] - a
    o = out_offsets[pos[i]]
    # a loop over slices: out[o + j] (signed index arithmetic) keeps LLVM from vectorising (~3x slower), and
    # slice assignment (out[o:o+n] = src) measured 2x slower than this loop
    src = values[a : a + n]
    dst = out_values[o : o + n]
    for j in range(n):
        dst[j] = src[j]


@njit
def _gather_values(offsets, values, rows, pos, out_offsets, out_values):
    m = rows.shape[0]
    for i in range(min(AHEAD, m)):
        prefetch_row(offsets, values, rows[i])
    for i in range(m):
        if i + AHEAD < m:  # the row two ahead loads while this one is copied (see native.prefetch)
            prefetch_row(offsets, values, rows[i + AHEAD])
        _gather_row(offsets, values, rows, pos, out_offsets, out_values, i)


@njit(parallel=True)
def _gather_values_parallel(offsets, values, rows, pos, out_offsets, out_values):
    m = rows.shape[0]
    for i in numba.prange(m):
        if i + AHEAD < m:
            prefetch_row(offsets, values, rows[i + AHEAD])
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


# ---- fused layouts: source rows (memory-mapped shard buffers or a gathered batch) straight into the outputs ----
@njit(inline="always")
def _pad_row(offsets, values, rows, pos, pad_id, label_pad, out_ids, out_mask, out_labels, i):
    r = rows[i]
    b = pos[i]
    a = offsets[r]
    n = min(offsets[r + 1] - a, out_ids.shape[1])
    # slice assignments compile to vectorised copies and fills (an element loop over out[b, j] measured ~4x
    # slower; for 1-D copies it is the other way round, see _gather_row)
    src = values[a : a + n]
    out_ids[b, :n] = src
    out_ids[b, n:] = pad_id
    out_labels[b, :n] = src
    out_labels[b, n:] = label_pad
    out_mask[b, :n] = 1
    out_mask[b, n:] = 0


@njit
def _pad_rows(offsets, values, rows, pos, pad_id, label_pad, out_ids, out_mask, out_labels):
    m = rows.shape[0]
    for i in range(min(AHEAD, m)):
        prefetch_row(offsets, values, rows[i])
    for i in range(m):
        if i + AHEAD < m:
            prefetch_row(offsets, values, rows[i + AHEAD])
        _pad_row(offsets, values, rows, pos, pad_id, label_pad, out_ids, out_mask, out_labels, i)


@njit(parallel=True)
def _pad_rows_parallel(offsets, values, rows, pos, pad_id, label_pad, out_ids, out_mask, out_labels):
    # rows are independent and only copied: the result is the same for any thread count
    m = rows.shape[0]
    for i in numba.prange(m):
        if i + AHEAD < m:
            prefetch_row(offsets, values, rows[i + AHEAD])
        _pad_row(offsets, values, rows, pos, pad_id, label_pad, out_ids, out_mask, out_labels, i)


@njit(inline="always")
def _pack_layout_row(out_offsets, ids, label_pad, out_pos, out_labels, b):
    o = out_offsets[b]
    n = out_offsets[b + 1] - o
    src = ids[o : o + n]
    d = out_labels[o : o + n]
    for j in range(n):
        d[j] = src[j]
    if n > 0:
        d[0] = label_pad
    d = out_pos[o : o + n]
    for j in range(n):
        d[j] = j


@njit
def _pack_layout(out_offsets, ids, label_pad, out_pos, out_labels):
    for b in range(out_offsets.shape[0] - 1):
        _pack_layout_row(out_offsets, ids, label_pad, out_pos, out_labels, b)


@njit(parallel=True)
def _pack_layout_parallel(out_offsets, ids, label_pad, out_pos, out_labels):
    for b in numba.prange(out_offsets.shape[0] - 1):
        _pack_layout_row(out_offsets, ids, label_pad, out_pos, out_labels, b)


def pack_layout(out_offsets: NDArray[np.int64], ids: NDArray, out_pos: NDArray, out_labels: NDArray, *,
                label_pad: int = -100, parallel: bool = False) -> None:
    """Position ids and labels of a packed batch whose ``ids`` are in place (e.g. written by :func:`gather_values`
    from the shards), in place: ``out_pos`` 0, 1, ... within each row, ``out_labels`` the ids with ``label_pad``
    at each row's first token.

    Gathering the ids first, then deriving labels from them while they are in cache, measured ~15 % faster than
    writing all three outputs row by row from the (memory-mapped, randomly accessed) source.

    Args:
        out_offsets: int64 ``[B+1]`` row starts in the outputs, from 0.
        ids, out_pos, out_labels: ``[T]`` with ``T >= out_offsets[-1]`` (any integer dtypes).
        parallel: split rows over Numba's threads (same result for any thread count).
    """
    if len(out_offsets) and not (out_offsets[0] == 0 and min(len(ids), len(out_pos), len(out_labels)) >= out_offsets[-1]):
        raise ValueError(f"out_offsets must start at 0 and end at most at the outputs' length (got "
                         f"{out_offsets[0]}..{out_offsets[-1]} for outputs of {len(ids)}, {len(out_pos)}, "
                         f"{len(out_labels)})")
    kernel = _pack_layout_parallel if parallel and len(out_offsets) > 65 else _pack_layout
    kernel(out_offsets, ids, label_pad, out_pos, out_labels)


def _check_rows(offsets: NDArray, rows: NDArray, pos: NDArray, nout: int) -> None:
    if rows.shape != pos.shape or rows.ndim != 1:
        raise ValueError(f"rows and pos must be 1-D of one length (got shapes {rows.shape} and {pos.shape})")
    if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= len(offsets) - 1):
        raise IndexError(f"rows must be in [0, {len(offsets) - 1}) (got min {rows.min()}, max {rows.max()})")
    if len(pos) and (int(pos.min()) < 0 or int(pos.max()) >= nout):
        raise IndexError(f"pos must be in [0, {nout}) (got min {pos.min()}, max {pos.max()})")


def pad_rows(offsets: NDArray, values: NDArray, rows: NDArray[np.int64], pos: NDArray[np.int64], out_ids: NDArray,
             out_mask: NDArray, out_labels: NDArray, *, pad_id: int = 0, label_pad: int = -100,
             parallel: bool = False, check: bool = True) -> None:
    """Write rows ``rows[i]`` of a ragged column (``values[offsets[r]:offsets[r+1]]``) as row ``pos[i]`` of a
    right-padded layout, in place: one pass from the source buffers (e.g. a memory-mapped shard) to the outputs.

    Rows longer than ``out_ids.shape[1]`` are truncated. Values are converted to the outputs' dtypes.

    Args:
        offsets, values: the source column (int32/int64 offsets ``[R+1]``, flat values).
        rows: int64 source rows; pos: int64 output rows ``[len(rows)]``.
        out_ids, out_mask, out_labels: ``[B, L]`` outputs (any integer dtypes).
        pad_id, label_pad: written into padding of ``out_ids`` / ``out_labels``.
        parallel: split rows over Numba's threads (same result for any thread count).
        check: validate ``rows``/``pos`` ranges (callers holding indices they built may skip it).
    """
    if check:
        if not (out_ids.ndim == 2 and out_ids.shape == out_mask.shape == out_labels.shape):
            raise ValueError(f"out_ids, out_mask, out_labels must be [B, L] of one shape (got {out_ids.shape}, "
                             f"{out_mask.shape}, {out_labels.shape})")
        _check_rows(offsets, rows, pos, out_ids.shape[0])
    kernel = _pad_rows_parallel if parallel and len(rows) > 1 else _pad_rows
    kernel(offsets, values, rows, pos, pad_id, label_pad, out_ids, out_mask, out_labels)


def pad_ragged(values: NDArray, offsets: NDArray, *, pad_id: int = 0, width: int | None = None,
               pad_to_multiple_of: int | None = None, label_pad: int = -100, alloc=np.empty,
               parallel: bool = False, dtype=np.int64, label_dtype=np.int64
               ) -> tuple[NDArray, NDArray, NDArray]:
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
        dtype: dtype of ``input_ids`` and ``attention_mask``; label_dtype: dtype of ``labels``.

    Returns:
        ``(input_ids [B, L], attention_mask [B, L], labels [B, L])`` (int64 unless ``dtype``/``label_dtype``).
    """
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    L = int(lengths.max()) if width is None and len(lengths) else int(width or 0)
    if pad_to_multiple_of:
        L = -(-L // pad_to_multiple_of) * pad_to_multiple_of
    B = len(lengths)
    ids = alloc((B, L), dtype)
    mask = alloc((B, L), dtype)
    labels = alloc((B, L), label_dtype)
    every = np.arange(B, dtype=np.int64)
    pad_rows(offsets, values, every, every, ids, mask, labels, pad_id=pad_id, label_pad=label_pad,
             parallel=parallel, check=False)
    return ids, mask, labels


def pack_ragged(values: NDArray, offsets: NDArray, *, label_pad: int = -100, alloc=np.empty,
                parallel: bool = False, dtype=np.int64, label_dtype=np.int64) -> tuple[NDArray, NDArray, NDArray]:
    """Padding-free layout of a ragged batch (flash-attention varlen / HF ``DataCollatorWithFlattening`` style).

    Args:
        values: flat token ids ``[T]`` (rows back to back); offsets: ``[B+1]``.
        alloc: ``alloc(shape, dtype) -> array`` for the outputs (see :func:`pad_ragged`).
        parallel: split rows over Numba's threads (see :func:`pad_ragged`).
        dtype: dtype of ``input_ids`` and ``position_ids``; label_dtype: dtype of ``labels``.

    Returns:
        ``(input_ids [T], position_ids [T], labels [T])`` (int64 unless ``dtype``/``label_dtype``); labels are the
        ids with ``label_pad`` at the first token of each sequence, so no sequence learns from its neighbour.
    """
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    out_offsets = offsets - offsets[0] if len(offsets) else np.zeros(1, dtype=np.int64)
    T = int(out_offsets[-1])
    ids = alloc(T, dtype)
    pos = alloc(T, dtype)
    labels = alloc(T, label_dtype)
    every = np.arange(len(out_offsets) - 1, dtype=np.int64)
    gather_values(offsets, values, every, every, out_offsets, ids, parallel=parallel)
    pack_layout(out_offsets, ids, pos, labels, label_pad=label_pad, parallel=parallel)
    return ids, pos, labels


# ---- pieces of documents into fixed-length rows (dataset decomposition batches) -------------------------------
@njit(inline="always")
def _fill(d, v):
    # explicit store loops: numba's slice assignment (d[:] = v) is about 2x slower here
    for j in range(d.shape[0]):
        d[j] = v


@njit(inline="always")
def _copy(d, src):
    for j in range(d.shape[0]):
        d[j] = src[j]


@njit(inline="always")
def _iota(d):
    for j in range(d.shape[0]):
        d[j] = j


@njit(inline="always")
def _place_piece(offsets, values, rows, starts, lengths, dst, label_pad, out_ids, out_labels, out_mask, out_pos, k):
    a = offsets[rows[k]] + starts[k]
    n = lengths[k]
    o = dst[k]
    src = values[a : a + n]
    _copy(out_ids[o : o + n], src)
    _copy(out_labels[o : o + n], src)
    if n > 0:
        out_labels[o] = label_pad  # each piece is a segment: it does not learn from the one before it
    _fill(out_mask[o : o + n], 1)
    _iota(out_pos[o : o + n])


@njit
def _place_pieces(offsets, values, rows, starts, lengths, dst, label_pad, out_ids, out_labels, out_mask, out_pos):
    for k in range(rows.shape[0]):
        _place_piece(offsets, values, rows, starts, lengths, dst, label_pad, out_ids, out_labels, out_mask, out_pos, k)


@njit
def _pad_tails(tokens, width, pad_id, label_pad, out_ids, out_labels, out_mask, out_pos):
    for b in range(tokens.shape[0]):
        o = b * width + tokens[b]
        n = width - tokens[b]
        _fill(out_ids[o : o + n], pad_id)
        _fill(out_labels[o : o + n], label_pad)
        _fill(out_mask[o : o + n], 0)
        _iota(out_pos[o : o + n])


def place_pieces(offsets: NDArray, values: NDArray, rows: NDArray[np.int64], starts: NDArray[np.int64],
                 lengths: NDArray[np.int64], dst: NDArray[np.int64], out_ids: NDArray, out_labels: NDArray,
                 out_mask: NDArray, out_pos: NDArray, *, label_pad: int = -100) -> None:
    """Copy pieces of rows of a ragged column into flat outputs, in place, each piece a segment of its own:
    piece ``k`` is ``values[offsets[rows[k]] + starts[k]:][:lengths[k]]``, written at ``dst[k]`` as ids, labels
    (``label_pad`` at the piece's first token), mask 1 and positions 0, 1, ...

    Args:
        offsets, values: the source column (e.g. a memory-mapped shard's buffers).
        rows, starts, lengths, dst: int64 ``[P]`` per piece.
        out_ids, out_labels, out_mask, out_pos: flat outputs (any integer dtypes).

    Raises:
        IndexError: a piece outside its row or outside the outputs.
    """
    rows, starts, lengths, dst = (np.ascontiguousarray(x, dtype=np.int64) for x in (rows, starts, lengths, dst))
    if len(rows):
        if rows.min() < 0 or rows.max() >= len(offsets) - 1:
            raise IndexError(f"rows must be in [0, {len(offsets) - 1}) (got min {rows.min()}, max {rows.max()})")
        room = np.asarray(offsets)[rows + 1] - np.asarray(offsets)[rows]
        if (starts < 0).any() or (lengths < 0).any() or (starts + lengths > room).any():
            k = int(np.flatnonzero((starts < 0) | (lengths < 0) | (starts + lengths > room))[0])
            raise IndexError(f"piece {k} ({starts[k]}:+{lengths[k]}) lies outside its row {rows[k]} of "
                             f"{room[k]} values")
        size = min(len(out_ids), len(out_labels), len(out_mask), len(out_pos))
        if dst.min() < 0 or (dst + lengths).max() > size:
            raise IndexError(f"pieces must land inside the outputs' {size} values")
    _place_pieces(offsets, values, rows, starts, lengths, dst, label_pad, out_ids, out_labels, out_mask, out_pos)


def pad_tails(tokens: NDArray[np.int64], width: int, out_ids: NDArray, out_labels: NDArray, out_mask: NDArray,
              out_pos: NDArray, *, pad_id: int = 0, label_pad: int = -100) -> None:
    """Fill row ``b``'s tail ``[tokens[b], width)`` of flat ``[B * width]`` outputs, in place: ``pad_id``,
    ``label_pad``, mask 0, positions 0, 1, ... (the padding is a segment of its own)."""
    tokens = np.ascontiguousarray(tokens, dtype=np.int64)
    if len(tokens) and (tokens.min() < 0 or tokens.max() > width):
        raise ValueError(f"tokens must be in [0, {width}] (got min {tokens.min()}, max {tokens.max()})")
    if min(len(out_ids), len(out_labels), len(out_mask), len(out_pos)) < len(tokens) * width:
        raise ValueError(f"outputs must hold {len(tokens)} x {width} values")
    _pad_tails(tokens, width, pad_id, label_pad, out_ids, out_labels, out_mask, out_pos)


def concat_ranges(lo: NDArray[np.int64], n: NDArray[np.int64]) -> NDArray[np.int64]:
    """Concatenation of ``arange(lo[i], lo[i] + n[i])`` for every i, vectorised (numpy, no kernel).

    Returns:
        int64 ``[n.sum()]``: the positions of a ragged selection (pieces of rows, rows of shards) in order.
    """
    lo, n = np.asarray(lo, dtype=np.int64), np.asarray(n, dtype=np.int64)
    total = int(n.sum())
    base = np.repeat(lo - np.concatenate([[0], np.cumsum(n)[:-1]]), n)
    return base + np.arange(total, dtype=np.int64)
