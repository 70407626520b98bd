"""torch.distributed collectives of :class:`samplers.NGAMEBatchSampler`: rank 0 merges the ranks' memory banks,
clusters, and broadcasts the cluster ids, so every rank slices the same plan. The windowed path (above
``EXACT_MAX_ROWS`` rows) needs only a barrier and a sum: the bank is one shared file, and each rank
clusters its own windows (:mod:`samplers.ngame_windowed`).

torch is imported inside each function, so importing this module (and ``samplers``) stays free of torch.
"""

from __future__ import annotations

import sys

import numpy as np
from numpy.typing import NDArray

__all__ = ["DistGroup", "all_sum", "any_rank", "barrier", "broadcast_ids", "dist_group",
           "sync_bank_to_rank0"]


class DistGroup:
    """The default process group as the collectives below use it: ``torch.distributed``, rank, size, device."""

    def __init__(self, dist, rank: int, world: int, device) -> None:
        self.dist, self.rank, self.world, self.device = dist, rank, world, device


def dist_group(world_size: int) -> DistGroup | None:
    """The initialised default process group when its size is ``world_size > 1``, else None."""
    if world_size <= 1 or "torch.distributed" not in sys.modules:  # never imported: no group can be initialised
        return None
    try:
        import torch
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != world_size:
        return None
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return DistGroup(dist, dist.get_rank(), world_size, dev)


def any_rank(group: DistGroup, flag: bool) -> bool:
    """Whether ``flag`` is True on any rank. Collective."""
    import torch

    t = torch.tensor([int(flag)], dtype=torch.int64, device=group.device)
    group.dist.all_reduce(t, op=group.dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(group: DistGroup) -> None:
    """Wait for every rank (windowed clustering: banks written before it starts, files before they are read).
    Collective."""
    group.dist.barrier()


def all_sum(group: DistGroup, values: NDArray[np.int64]) -> NDArray[np.int64]:
    """Elementwise sum of an int64 array over the ranks (each rank fills its own entries, zeros elsewhere).
    Collective."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)).to(group.device)
    group.dist.all_reduce(t, op=group.dist.ReduceOp.SUM)
    return t.cpu().numpy().astype(np.int64)


def sync_bank_to_rank0(group: DistGroup, bank: NDArray | None, stamp: NDArray[np.int64]) -> NDArray | None:
    """Merge the ranks' banks on rank 0: each row from the rank that wrote it last (lowest rank on ties).

    Collective. Returns the merged float32 ``[n, d]`` bank on rank 0 when every row has an embedding somewhere,
    else None (and None on other ranks).
    """
    import torch

    dist, dev = group.dist, group.device
    d = torch.tensor([0 if bank is None else bank.shape[1]], dtype=torch.int64, device=dev)
    dist.all_reduce(d, op=dist.ReduceOp.MAX)
    d = int(d.item())
    if d == 0:
        return None
    st = torch.from_numpy(stamp).to(dev)
    newest = st.clone()
    dist.all_reduce(newest, op=dist.ReduceOp.MAX)
    claim = torch.where((st == newest) & (st >= 0), group.rank, group.world)
    dist.all_reduce(claim, op=dist.ReduceOp.MIN)
    mine = (claim == group.rank).cpu().numpy()
    contrib = np.zeros((len(stamp), d), dtype=np.float32)
    if bank is not None:
        if bank.shape[1] != d:
            raise ValueError(f"rank {group.rank} has a bank of dimension {bank.shape[1]} but another rank has {d}")
        contrib[mine] = bank[mine]
    t = torch.from_numpy(contrib).to(dev)
    dist.reduce(t, dst=0, op=dist.ReduceOp.SUM)
    if group.rank != 0 or bool((newest < 0).any()):
        return None
    return t.cpu().numpy()


def broadcast_ids(group: DistGroup, ids: NDArray[np.int64] | None, n: int) -> NDArray[np.int64] | None:
    """Broadcast rank 0's cluster ids (or its 'no clustering') to every rank. Collective."""
    import torch

    ok = torch.tensor([int(ids is not None)], dtype=torch.int64, device=group.device)
    group.dist.broadcast(ok, src=0)
    if not ok.item():
        return None
    buf = torch.from_numpy(ids) if group.rank == 0 else torch.empty(n, dtype=torch.int64)
    buf = buf.to(group.device)
    group.dist.broadcast(buf, src=0)
    return buf.cpu().numpy().astype(np.int64)
