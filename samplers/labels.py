"""Loss-side helpers over a row -> label matrix (CSR), for samplers whose batches are built for in-batch losses.

:func:`positive_mask` gives NGAME's in-batch positive mask ("NGAME: Negative Mining-aware Mini-batching for
Extreme Classification", Dahiya et al., WSDM 2023): which rows of a batch are positives of which.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["positive_mask"]


def positive_mask(batch_rows: ArrayLike, label_indptr: ArrayLike, label_indices: ArrayLike, *,
                  batch_labels: ArrayLike | None = None):
    """The in-batch positive mask from the full (CSR) label matrix, for NGAME's in-batch loss.

    Args:
        batch_rows: int ``[B]`` row indices of the batch.
        label_indptr: int ``[n + 1]`` CSR row pointer of the row -> label matrix.
        label_indices: int ``[nnz]`` label ids of every row, row after row.
        batch_labels: optional int ``[B]``: the label sampled for each row (the batch's label candidates).

    Returns:
        torch.bool ``[B, B]``: ``mask[i, j]`` is True when rows ``i`` and ``j`` share a positive label (so
        ``mask[i, i]`` is True for every row with a label), or, with ``batch_labels``, when
        ``batch_labels[j]`` is a positive label of row ``i``.

    Raises:
        ValueError: malformed CSR arrays, rows out of range, ``batch_labels`` of the wrong length.
    """
    import torch

    rows = np.asarray(batch_rows)
    if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
        raise ValueError(f"batch_rows must be a 1-D integer array (got shape {rows.shape}, dtype {rows.dtype})")
    indptr = np.asarray(label_indptr, dtype=np.int64)
    indices = np.asarray(label_indices)
    if indptr.ndim != 1 or len(indptr) < 1 or indptr[0] != 0 or (np.diff(indptr) < 0).any() \
            or indptr[-1] > len(indices):
        raise ValueError("label_indptr must be a 1-D non-decreasing CSR pointer starting at 0 and ending at most at "
                         f"len(label_indices)={len(indices)}")
    n = len(indptr) - 1
    rows = rows.astype(np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"batch_rows must be in [0, {n}) (got min {rows.min()}, max {rows.max()})")
    B = len(rows)
    starts, lens = indptr[rows], indptr[rows + 1] - indptr[rows]
    owner = np.repeat(np.arange(B), lens)
    pos = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(starts, lens)
    labels = np.asarray(indices[pos], dtype=np.int64)
    if batch_labels is not None:
        bl = np.asarray(batch_labels, dtype=np.int64)
        if bl.shape != (B,):
            raise ValueError(f"batch_labels must have shape [{B}] like batch_rows (got {bl.shape})")
        uniq, inv = np.unique(np.concatenate([labels, bl]), return_inverse=True)
    else:
        uniq, inv = np.unique(labels, return_inverse=True)
    A = torch.zeros((B, len(uniq)), dtype=torch.float32)
    A[torch.from_numpy(owner), torch.from_numpy(inv[: len(labels)])] = 1.0
    if batch_labels is not None:
        return A[:, torch.from_numpy(inv[len(labels):])] > 0
    return (A @ A.T) > 0
