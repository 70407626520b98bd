"""Plan kernels: cut an ordered list of rows into batches, and even a batch list out across ranks.

Every sampler computes its epoch as a *plan*: a flat int64 array of rows plus batch offsets. These kernels
build and reshape plans; they take arrays and return arrays.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from native._config import njit
from native.sorted_cuts import cut_segment


@njit
def _budget_cuts(lengths: np.ndarray, max_tokens: np.int64, max_rows: np.int64) -> np.ndarray:
    n = lengths.shape[0]
    offsets = np.zeros(n + 1, dtype=np.int64)
    nb = cut_segment(lengths, 0, n, max_rows, max_tokens, 0.0, offsets, 0) if n else 0
    return offsets[: nb + 1].copy()


def budget_cuts(lengths: NDArray, max_tokens: int, max_rows: int | None = None) -> NDArray[np.int64]:
    """Cut a sequence of lengths, in the given order, into batches whose padded size fits a budget.

    A batch ``[a, b)`` keeps ``(b - a) * max(lengths[a:b]) <= max_tokens`` and ``b - a <= max_rows``. A single
    row longer than the budget forms a batch on its own (callers decide whether that is an error). The cut is
    :func:`native.sorted_cuts.cut_segment`'s linear rule, the one every token-budget plan uses.

    Args:
        lengths: 1-D integer array, ``>= 0``.
        max_tokens: padded token budget per batch, ``>= 1``.
        max_rows: optional cap on rows per batch.

    Returns:
        int64 offsets ``[num_batches + 1]`` into ``lengths``.
    """
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 (got {max_tokens=})")
    cap = np.iinfo(np.int64).max if max_rows is None else int(max_rows)
    if cap < 1:
        raise ValueError(f"max_rows must be >= 1 (got {max_rows=})")
    return _budget_cuts(lengths, np.int64(max_tokens), np.int64(cap))


@njit
def _split_to_multiple(sizes: np.ndarray, multiple: np.int64) -> np.ndarray:
    # Repeatedly split the largest batch (first one on ties) in two halves until the count is a multiple.
    nb = sizes.shape[0]
    rem = nb % multiple
    need = 0 if rem == 0 else multiple - rem
    out = np.empty(nb + need, dtype=np.int64)
    out[:nb] = sizes
    cur = nb
    for _ in range(need):
        best = 0
        for j in range(cur):
            if out[j] > out[best]:
                best = j
        big = out[best]
        if big < 2:
            return out[:0].copy()
        # insert the second half right after the split batch to keep the order of rows intact
        for j in range(cur, best + 1, -1):
            out[j] = out[j - 1]
        out[best] = big - big // 2
        out[best + 1] = big // 2
        cur += 1
    return out


def split_to_multiple(sizes: NDArray[np.int64], multiple: int) -> NDArray[np.int64]:
    """Split batches until their count is a multiple of ``multiple``, keeping row order and every row.

    The largest batch is halved each time, so every batch stays within its original budget (a batch's padded
    size can only shrink when it loses rows).

    Args:
        sizes: int64 batch sizes (each ``>= 1``), in plan order.
        multiple: the world size.

    Returns:
        int64 sizes whose length is the next multiple of ``multiple`` and whose sum is unchanged.

    Raises:
        ValueError: when there are fewer rows than the number of batches needed.
    """
    sizes = np.ascontiguousarray(sizes, dtype=np.int64)
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1 (got {multiple=})")
    if len(sizes) == 0:
        return sizes.copy()
    out = _split_to_multiple(sizes, np.int64(multiple))
    if len(out) == 0:
        need = -(-len(sizes) // multiple) * multiple
        raise ValueError(
            f"cannot give each of {multiple} ranks the same number of batches: {int(sizes.sum())} rows "
            f"cannot fill {need} batches; use fewer ranks or drop_last=True"
        )
    return out


@njit
def _fill_sizes(n: np.int64, batch_size: np.int64, num_batches: np.int64) -> np.ndarray:
    sizes = np.full(num_batches, batch_size, dtype=np.int64)
    excess = num_batches * batch_size - n
    j = num_batches - 1
    while excess > 0 and j >= 0:
        take = min(excess, batch_size - 1)
        sizes[j] -= take
        excess -= take
        j -= 1
    return sizes


def fixed_sizes(n: int, batch_size: int, multiple: int = 1, drop_last: bool = False) -> NDArray[np.int64]:
    """Batch sizes for ``n`` rows in batches of ``batch_size``, the count a multiple of ``multiple``.

    With ``drop_last`` every batch is full and the rows that do not fill ``multiple`` full batches are left
    out (the caller counts them). Without it every row is kept: the last batches are shortened (each keeps at
    least one row) so the count is a multiple of ``multiple``.

    Returns:
        int64 sizes; ``sizes.sum()`` is ``n`` (or less with ``drop_last``).
    """
    if drop_last:
        steps = n // (batch_size * multiple)
        return np.full(steps * multiple, batch_size, dtype=np.int64)
    steps = -(-n // (batch_size * multiple))
    nb = steps * multiple
    if nb > n:
        # too few rows for every rank to get a non-empty batch at the last step: keep what fills whole steps
        nb -= multiple
        n = min(n, nb * batch_size)
    return _fill_sizes(np.int64(n), np.int64(batch_size), np.int64(nb))
