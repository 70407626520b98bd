"""The integer dtypes a batch's token tensors may have (``dtype=`` of the collators and of
``datapipe.DecomposedDataset``), given as a torch dtype, a numpy dtype or a string."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["np_dtype"]


def np_dtype(dtype, name: str) -> np.dtype:
    """int32/int64 given as a torch dtype, a numpy dtype or a string -> numpy dtype."""
    d = dtype
    if isinstance(d, torch.dtype):
        d = {torch.int32: np.int32, torch.int64: np.int64}.get(d, d)
    try:
        d = np.dtype(d)
    except TypeError:
        d = None
    if d not in (np.dtype(np.int32), np.dtype(np.int64)):
        raise ValueError(f"{name} must be int32 or int64 (torch.int32, 'int32', np.int64, ...) (got {name}={dtype!r})")
    return d
