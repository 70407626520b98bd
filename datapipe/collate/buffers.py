"""Output buffers shared by the collators (``pad``, ``packed``, ``features_collator``): where a batch's arrays
are allocated (shared memory in a DataLoader worker, recycled buffers elsewhere)."""

from __future__ import annotations

import numpy as np
import torch

from datapipe.collate._pool import POOL

__all__ = ["outputs"]


def outputs(count: int = 3):
    """``(alloc, to_tensor)``: outputs in shared memory inside a DataLoader worker (as torch's default_collate
    does), so the batch crosses to the main process without another copy; recycled buffers elsewhere.

    In a worker, the ``count`` outputs of one batch (same shape and dtype) are views of one shared-memory
    tensor: one segment and one file descriptor cross per batch instead of one per output."""
    if torch.utils.data.get_worker_info() is None:
        return POOL.alloc, torch.from_numpy
    made: dict[int, torch.Tensor] = {}
    block: list = []

    def alloc(shape, dtype):
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        tdtype = torch.from_numpy(np.empty(0, dtype)).dtype
        if not block or block[0].shape[1:] != shape or block[0].dtype != tdtype or block[1] >= count:
            block[:] = [torch.empty((count, *shape), dtype=tdtype).share_memory_(), 0]
        t = block[0][block[1]]
        block[1] += 1
        a = t.numpy()
        made[id(a)] = t
        return a

    return alloc, lambda a: made.pop(id(a)) if id(a) in made else torch.from_numpy(a)
