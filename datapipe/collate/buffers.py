"""Output buffers shared by the collators (``pad``, ``packed``, ``features_collator``): where a batch's arrays
are allocated (one shared-memory block in a DataLoader worker, one recycled buffer elsewhere)."""

from __future__ import annotations

import numpy as np
import torch

from datapipe.collate._pool import POOL, group_layout

__all__ = ["output_group"]


def output_group(specs) -> tuple[list[np.ndarray], object]:
    """``(arrays, to_tensor)``: one batch's output arrays for ``specs`` (``[(shape, dtype), ...]``) carved from one
    buffer, and the function giving each array's tensor. Inside a DataLoader worker the buffer is one shared-memory
    tensor (one segment and one file descriptor cross to the main process per batch); elsewhere a recycled buffer
    of :data:`POOL` (one allocation per batch)."""
    if torch.utils.data.get_worker_info() is None:
        return POOL.alloc_group(specs), torch.from_numpy
    layout, total = group_layout(specs)
    block = torch.empty(max(total, 1), dtype=torch.uint8).share_memory_()
    tensors = [block[o : o + n].view(torch.from_numpy(np.empty(0, dt)).dtype).view(shape) for o, n, shape, dt in layout]
    arrays = [t.numpy() for t in tensors]
    made = {id(a): t for a, t in zip(arrays, tensors)}
    return arrays, lambda a: made[id(a)] if id(a) in made else torch.from_numpy(a)
