"""Rows of many shards in one kernel call: a batch of random rows reads from the memory maps of every shard it
touches, addressed through per-shard buffer addresses.

A random batch of a dataset of ``S`` shards touches nearly ``min(S, B)`` shards. Gathering shard by shard costs a
Python-level call (or a parallel region) per shard: at ~90 shards per batch that was ~1 ms per batch, ten times
the copy itself. These kernels take, per shard, the address of its offsets and values buffers (``int64 [S]``; 0 for
a shard not open) and, per row, its shard and row within the shard, and do the whole batch in one call; the
``*_like`` arrays only carry the buffers' dtypes. The caller keeps every touched shard's buffers alive for the
call (``datapipe.dataset.ShardRows`` holds them).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic
from numpy.typing import NDArray

from native._config import njit
from native.prefetch import AHEAD, prefetch

__all__ = ["gather_flat", "gather_shard_values", "pad_shard_rows", "shard_row_offsets"]


@intrinsic
def _voidptr(typingctx, addr):
    if not isinstance(addr, types.Integer):
        return None
    sig = types.voidptr(addr)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return sig, codegen


@njit(inline="always")
def _buffer(addr, n, like):
    return numba.carray(_voidptr(addr), n, like.dtype)


@njit(inline="always")
def _row(off_addr, val_addr, s, r, off_like, val_like):
    off = _buffer(off_addr[s], r + 2, off_like)
    a = off[r]
    b = off[r + 1]
    return _buffer(val_addr[s], b, val_like)[a:b]


@njit(inline="always")
def _prefetch_row(off_addr, val_addr, s, r, off_like, val_like):
    src = _row(off_addr, val_addr, s, r, off_like, val_like)
    step = max(1, 64 // src.itemsize)
    for k in range(0, min(src.shape[0], 64 * step), step):
        prefetch(src, k)


@njit
def _row_offsets(off_addr, shard, local, off_like, out):
    out[0] = 0
    for i in range(shard.shape[0]):
        r = local[i]
        off = _buffer(off_addr[shard[i]], r + 2, off_like)
        out[i + 1] = out[i] + off[r + 1] - off[r]


@njit(inline="always")
def _copy_row(off_addr, val_addr, shard, local, out_offsets, out_values, off_like, val_like, i):
    src = _row(off_addr, val_addr, shard[i], local[i], off_like, val_like)
    o = out_offsets[i]
    dst = out_values[o : o + src.shape[0]]
    for j in range(src.shape[0]):
        dst[j] = src[j]


@njit
def _gather(off_addr, val_addr, shard, local, out_offsets, out_values, off_like, val_like):
    m = shard.shape[0]
    for i in range(m):
        if i + AHEAD < m:
            _prefetch_row(off_addr, val_addr, shard[i + AHEAD], local[i + AHEAD], off_like, val_like)
        _copy_row(off_addr, val_addr, shard, local, out_offsets, out_values, off_like, val_like, i)


@njit(parallel=True)
def _gather_parallel(off_addr, val_addr, shard, local, out_offsets, out_values, off_like, val_like):
    m = shard.shape[0]
    for i in numba.prange(m):
        if i + AHEAD < m:
            _prefetch_row(off_addr, val_addr, shard[i + AHEAD], local[i + AHEAD], off_like, val_like)
        _copy_row(off_addr, val_addr, shard, local, out_offsets, out_values, off_like, val_like, i)


@njit(inline="always")
def _pad_one(off_addr, val_addr, shard, local, off_like, val_like, pad_id, label_pad, ids, mask, labels, i):
    src = _row(off_addr, val_addr, shard[i], local[i], off_like, val_like)
    n = min(src.shape[0], ids.shape[1])
    ids[i, :n] = src[:n]
    ids[i, n:] = pad_id
    labels[i, :n] = src[:n]
    labels[i, n:] = label_pad
    mask[i, :n] = 1
    mask[i, n:] = 0


@njit
def _pad(off_addr, val_addr, shard, local, off_like, val_like, pad_id, label_pad, ids, mask, labels):
    m = shard.shape[0]
    for i in range(m):
        if i + AHEAD < m:
            _prefetch_row(off_addr, val_addr, shard[i + AHEAD], local[i + AHEAD], off_like, val_like)
        _pad_one(off_addr, val_addr, shard, local, off_like, val_like, pad_id, label_pad, ids, mask, labels, i)


@njit(parallel=True)
def _pad_parallel(off_addr, val_addr, shard, local, off_like, val_like, pad_id, label_pad, ids, mask, labels):
    m = shard.shape[0]
    for i in numba.prange(m):
        if i + AHEAD < m:
            _prefetch_row(off_addr, val_addr, shard[i + AHEAD], local[i + AHEAD], off_like, val_like)
        _pad_one(off_addr, val_addr, shard, local, off_like, val_like, pad_id, label_pad, ids, mask, labels, i)


@njit
def _flat(addr, shard, local, like, out):
    for i in range(shard.shape[0]):
        out[i] = _buffer(addr[shard[i]], local[i] + 1, like)[local[i]]


def shard_row_offsets(off_addr: NDArray[np.int64], shard: NDArray[np.int64], local: NDArray[np.int64],
                      off_like: NDArray, out: NDArray[np.int64]) -> None:
    """``out`` (int64 ``[B+1]``): offsets of rows ``local[i]`` of shards ``shard[i]`` laid back to back (in place).

    Args:
        off_addr: int64 ``[S]`` address of each shard's offsets buffer (every ``shard[i]``'s must be open).
        shard, local: int64 ``[B]`` shard and row within it, per batch row.
        off_like: an array of the offsets' dtype (int32 or int64).
    """
    _row_offsets(off_addr, shard, local, off_like, out)


def gather_shard_values(off_addr: NDArray[np.int64], val_addr: NDArray[np.int64], shard: NDArray[np.int64],
                        local: NDArray[np.int64], out_offsets: NDArray[np.int64], out_values: NDArray,
                        off_like: NDArray, val_like: NDArray, *, parallel: bool = False) -> None:
    """Copy row ``local[i]`` of shard ``shard[i]`` to ``out_values[out_offsets[i]:]`` for every batch row, in one
    call (``parallel``: rows split over Numba's threads; same result)."""
    kernel = _gather_parallel if parallel and len(shard) > 64 else _gather
    kernel(off_addr, val_addr, shard, local, out_offsets, out_values, off_like, val_like)


def pad_shard_rows(off_addr: NDArray[np.int64], val_addr: NDArray[np.int64], shard: NDArray[np.int64],
                   local: NDArray[np.int64], off_like: NDArray, val_like: NDArray, ids: NDArray, mask: NDArray,
                   labels: NDArray, *, pad_id: int = 0, label_pad: int = -100, parallel: bool = False) -> None:
    """Right-padded ``ids``/``mask``/``labels`` ``[B, L]`` from row ``local[i]`` of shard ``shard[i]`` (truncated
    at ``L``), in one call."""
    kernel = _pad_parallel if parallel and len(shard) > 64 else _pad
    kernel(off_addr, val_addr, shard, local, off_like, val_like, pad_id, label_pad, ids, mask, labels)


def gather_flat(addr: NDArray[np.int64], shard: NDArray[np.int64], local: NDArray[np.int64], like: NDArray,
                out: NDArray) -> None:
    """``out[i] = column[shard[i]][local[i]]`` for a fixed-width column (each shard's buffer at ``addr[s]``)."""
    _flat(addr, shard, local, like, out)
