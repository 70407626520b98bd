"""Windowed token-budget plans: batches of one window of rows depend on nothing else.

A window is a contiguous range of a *block-level* permutation: rows are grouped into blocks of ``block``
contiguous rows (one or two cache lines of an int32 length column, so a pass over the lengths reads memory
almost sequentially, also through a memory map), the blocks are permuted by a stateless Feistel permutation
(``native.feistel``), and window ``w`` holds the rows of permuted blocks ``[w * per_window, (w + 1) *
per_window)``. Inside a window the rows are shuffled (Fisher-Yates, seed ``mix_step(prefix, w)``), cut into
chunks of ``sort_window`` rows, each chunk sorted by length (stable), and batches cut greedily under the padded
budget (``native.sorted_cuts``, the kernel of the exact plan too): the "random yet tight" batches of DESIGN.md,
window by window.

:func:`window_sizes` is the counting pass (batch sizes of many windows, in parallel over windows: each window's
integers are computed on their own, so the result is bitwise the same for any thread count);
:func:`window_batches` gives one window's rows and batch offsets when its batches are yielded.
"""

from __future__ import annotations

import numba
import numpy as np
from numpy.typing import NDArray

from native._config import njit
from native.feistel import feistel_keyed, half_bits, round_keys
from native.rng import MASK63, mix_step, shuffle_inplace
from native.sorted_cuts import sort_cut

__all__ = ["take_window", "window_batches", "window_blocks", "window_major_order", "window_sizes"]


@njit
def window_blocks(w: np.int64, n: np.int64, block: np.int64, per_window: np.int64, permute: bool,
                  block_seed: np.uint64) -> np.ndarray:
    """int64 ids of the blocks of window ``w`` (blocks of ``block`` rows of ``n``; ``per_window`` per window), in
    the order of the stateless Feistel permutation of all blocks (``permute``), else in order. A bare kernel."""
    nblocks = (n + block - 1) // block
    b0 = w * per_window
    b1 = min(nblocks, b0 + per_window)
    out = np.empty(max(b1 - b0, 0), dtype=np.int64)
    h = half_bits(nblocks) if nblocks > 1 else np.int64(1)
    keys = round_keys(block_seed)
    for k in range(b0, b1):
        out[k - b0] = feistel_keyed(k, nblocks, h, keys) if permute and nblocks > 1 else k
    return out


@njit
def _window_major(wcum: np.ndarray, window_seed: np.uint64, prefix: np.uint64) -> np.ndarray:
    nw = wcum.shape[0] - 1
    out = np.empty(wcum[nw], dtype=np.int64)
    wkeys = round_keys(window_seed)
    hw = half_bits(nw) if nw > 1 else np.int64(1)
    at = 0
    for j in range(nw):
        w = feistel_keyed(j, nw, hw, wkeys) if nw > 1 else j
        a = wcum[w]
        m = wcum[w + 1] - a
        if m > 1:
            keys = round_keys(mix_step(prefix, np.uint64(w)) & MASK63)
            h = half_bits(m)
            for k in range(m):
                out[at + k] = a + feistel_keyed(k, m, h, keys)
        elif m == 1:
            out[at] = a
        at += m
    return out


def window_major_order(wcum: NDArray[np.int64], window_seed: int, prefix: int) -> NDArray[np.int64]:
    """A deal of the batches of all windows that keeps each window's batches together: the windows in a seeded
    random order (Feistel, ``window_seed``), each window's batches in a random order of their own (Feistel keyed
    ``mix_step(prefix, w)``). ``wcum``: int64 ``[W+1]`` first batch of each window (window order). Returns int64
    ``[wcum[-1]]``: plan batch -> window-order batch. Consecutive plan batches then come from one window, so a rank
    plans each window once per ``batches in the window / world_size`` steps instead of once per batch."""
    return _window_major(np.ascontiguousarray(wcum, dtype=np.int64), np.uint64(int(window_seed) & 0xFFFFFFFFFFFFFFFF),
                         np.uint64(int(prefix) & 0xFFFFFFFFFFFFFFFF))


@njit
def take_window(values: np.ndarray, w: np.int64, n: np.int64, block: np.int64, per_window: np.int64, permute: bool,
                block_seed: np.uint64, limit, rows_out: np.ndarray, vals_out: np.ndarray) -> tuple[np.int64, np.int64]:
    """The rows of window ``w`` in block-permutation order and their values, rows whose value exceeds ``limit``
    left out: written to ``rows_out`` / ``vals_out`` (``per_window * block`` long at least; any numeric dtype for
    the values). Returns ``(rows kept, rows left out)``. A bare kernel (the windowed samplers' common first step)."""
    blocks = window_blocks(w, n, block, per_window, permute, block_seed)
    at = 0
    dropped = 0
    for blk in blocks:
        lo = blk * block
        hi = min(n, lo + block)
        for i in range(lo, hi):
            v = values[i]
            if v <= limit:
                rows_out[at] = i
                vals_out[at] = v
                at += 1
            else:
                dropped += 1
    return at, dropped


@njit
def _window_take(lengths: np.ndarray, w: np.int64, n: np.int64, block: np.int64, per_window: np.int64,
                 permute: bool, block_seed: np.uint64, prefix: np.uint64, max_tokens: np.int64,
                 as_rows: bool) -> tuple[np.ndarray, np.int64]:
    """Window ``w``'s rows (``as_rows``) or their lengths, block-permuted then shuffled, rows over ``max_tokens``
    left out; and how many were left out. Both give the same order: a Fisher-Yates shuffle depends only on the
    length of what it shuffles."""
    cap = per_window * block
    rows = np.empty(cap, dtype=np.int64)
    lens = np.empty(cap, dtype=np.int64)
    at, dropped = take_window(lengths, w, n, block, per_window, permute, block_seed, max_tokens, rows, lens)
    out = rows[:at] if as_rows else lens[:at]
    if permute:
        state = np.empty(1, dtype=np.uint64)
        state[0] = mix_step(prefix, np.uint64(w)) & MASK63
        shuffle_inplace(out, state)
    return out, dropped


@njit
def _window_cuts(lens: np.ndarray, rows: np.ndarray, with_rows: bool, sort_window: np.int64, max_tokens: np.int64,
                 max_rows: np.int64) -> np.ndarray:
    """Sort ``lens`` (and ``rows`` alongside, ``with_rows``) in chunks of ``sort_window`` and cut them under the
    budget (``native.sorted_cuts``, the kernel of the exact plans too); returns the batch offsets. Without rows
    only the lengths travel: the order of ties does not change a sorted sequence, so the counting pass gets the
    same batch sizes for less than planning the rows."""
    seg = np.zeros(2, dtype=np.int64)
    seg[1] = lens.shape[0]
    chunk = np.full(1, sort_window, dtype=np.int64)
    caps = np.full(1, max_rows, dtype=np.int64)
    cuts, _ = sort_cut(lens, rows, with_rows, seg, chunk, False, caps, max_tokens, 0.0)
    return cuts


@njit
def _window_plan(lengths: np.ndarray, w: np.int64, n: np.int64, block: np.int64, per_window: np.int64,
                 permute: bool, block_seed: np.uint64, prefix: np.uint64, sort_window: np.int64,
                 max_tokens: np.int64, max_rows: np.int64) -> tuple[np.ndarray, np.ndarray, np.int64]:
    rows, dropped = _window_take(lengths, w, n, block, per_window, permute, block_seed, prefix, max_tokens, True)
    at = rows.shape[0]
    lens = np.empty(at, dtype=np.int64)
    for i in range(at):
        lens[i] = lengths[rows[i]]
    cuts = _window_cuts(lens, rows, True, sort_window, max_tokens, max_rows)
    return rows, cuts, dropped


@njit(parallel=True)
def _window_sizes(lengths: np.ndarray, w0: np.int64, w1: np.int64, n: np.int64, block: np.int64,
                  per_window: np.int64, permute: bool, block_seed: np.uint64, prefix: np.uint64,
                  sort_window: np.int64, max_tokens: np.int64, max_rows: np.int64):
    k = w1 - w0
    cap = per_window * block
    counts = np.zeros(k, dtype=np.int64)
    sizes = np.zeros((k, cap), dtype=np.int32)
    stats = np.zeros((k, 3), dtype=np.int64)  # dropped rows, tokens, padded tokens
    for i in numba.prange(k):
        lens, dropped = _window_take(lengths, w0 + i, n, block, per_window, permute, block_seed, prefix,
                                     max_tokens, False)
        cuts = _window_cuts(lens, lens[:0], False, sort_window, max_tokens, max_rows)
        nb = cuts.shape[0] - 1
        counts[i] = nb
        tokens = 0
        padded = 0
        for b in range(nb):
            size = cuts[b + 1] - cuts[b]
            sizes[i, b] = size
            top = 0
            for j in range(cuts[b], cuts[b + 1]):
                v = lens[j]
                tokens += v
                if v > top:
                    top = v
            padded += top * size
        stats[i, 0] = dropped
        stats[i, 1] = tokens
        stats[i, 2] = padded
    return counts, sizes, stats


def _args(n, block, per_window, permute, block_seed, prefix, sort_window, max_tokens, max_rows):
    if block < 1 or per_window < 1 or sort_window < 1 or max_tokens < 1:
        raise ValueError(f"block, per_window, sort_window and max_tokens must be >= 1 (got {block=}, "
                         f"{per_window=}, {sort_window=}, {max_tokens=})")
    cap = np.iinfo(np.int64).max if max_rows is None else int(max_rows)
    return (np.int64(n), np.int64(block), np.int64(per_window), bool(permute),
            np.uint64(int(block_seed) & 0xFFFFFFFFFFFFFFFF), np.uint64(int(prefix) & 0xFFFFFFFFFFFFFFFF),
            np.int64(sort_window), np.int64(max_tokens), np.int64(cap))


def window_sizes(lengths: NDArray, w0: int, w1: int, *, block: int, per_window: int, permute: bool,
                 block_seed: int, prefix: int, sort_window: int, max_tokens: int,
                 max_rows: int | None = None) -> tuple[list[NDArray[np.int32]], NDArray[np.int64]]:
    """Batch sizes of windows ``[w0, w1)`` (the counting pass; parallel over windows, bitwise reproducible).

    Args:
        lengths: integer ``[N]`` lengths (any integer dtype; a memory map is read, not copied).
        w0, w1: window range.
        block: rows per block; per_window: blocks per window.
        permute: shuffle (block permutation seeded ``block_seed``, in-window shuffles by ``prefix``); else rows
            in order.
        sort_window, max_tokens, max_rows: as ``TokenBudgetBatchSampler``'s.

    Returns:
        ``(sizes, stats)``: per window an int32 array of batch sizes, and int64 ``[w1 - w0, 3]`` (rows dropped
        as longer than ``max_tokens``, tokens, padded tokens) per window.
    """
    a = _args(len(lengths), block, per_window, permute, block_seed, prefix, sort_window, max_tokens, max_rows)
    counts, sizes, stats = _window_sizes(lengths, np.int64(w0), np.int64(w1), *a)
    return [sizes[i, : counts[i]].copy() for i in range(len(counts))], stats


def window_batches(lengths: NDArray, w: int, *, block: int, per_window: int, permute: bool, block_seed: int,
                   prefix: int, sort_window: int, max_tokens: int,
                   max_rows: int | None = None) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Rows and batch offsets of window ``w`` (arguments as :func:`window_sizes`).

    Returns:
        ``(rows, offsets)``: int64 rows of the window's batches, batch after batch, and int64 ``[B_w + 1]``.
    """
    a = _args(len(lengths), block, per_window, permute, block_seed, prefix, sort_window, max_tokens, max_rows)
    rows, cuts, _ = _window_plan(lengths, np.int64(w), *a)
    return rows, cuts
