"""Plans kept as batch sizes over a virtual stream of rows: what a sampler needs at 1e9 rows.

A materialised :class:`samplers.base.Plan` holds every row of the epoch (8 B/row on every rank). Samplers whose
epoch is a *stream* (a stateless permutation of the rows, or a sequence of independently planned windows) keep
only the batch sizes instead: batch ``b`` of the arranged global plan holds the stream positions
``[base + offsets[b], base + offsets[b + 1])``, and the sampler maps positions to rows on demand (e.g.
``native.feistel.feistel_permute``). Arranging for ``world_size`` ranks and resuming at another world size
(elastic) change only the sizes and ``base``: :func:`even_out_sizes` and :func:`arrange_sizes` mirror
:func:`samplers.base.even_out` and ``BatchSamplerBase._plans`` exactly (a split batch keeps its rows in order,
so every batch stays a contiguous range of the stream), which the tests check against the materialised path.

Memory: ``8 B`` per batch (``sizes`` and ``offsets``), nothing per row.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.typing import NDArray

from native.batching import split_to_multiple

__all__ = ["SizePlan", "arrange_sizes", "even_out_sizes"]


@dataclasses.dataclass
class SizePlan:
    """Batches as contiguous ranges of a stream: batch ``b`` is positions ``[base + offsets[b], base +
    offsets[b+1])``.

    Attributes:
        base: stream position of the first row of batch 0.
        sizes: int64 ``[B]`` rows per batch.
        dropped: reason -> rows left out of the epoch.
    """

    base: int
    sizes: NDArray[np.int64]
    dropped: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sizes = np.ascontiguousarray(self.sizes, dtype=np.int64)
        self.offsets = np.zeros(len(self.sizes) + 1, dtype=np.int64)
        np.cumsum(self.sizes, out=self.offsets[1:])

    @property
    def num_batches(self) -> int:
        return len(self.sizes)

    @property
    def rows(self) -> int:
        return int(self.offsets[-1])

    def span(self, batch: int) -> tuple[int, int]:
        """Stream positions ``(start, stop)`` of batch ``batch``."""
        return self.base + int(self.offsets[batch]), self.base + int(self.offsets[batch + 1])

    def skip(self, count: int) -> SizePlan:
        """The plan without its first ``count`` batches (what ``take_batches(plan, arange(count, B))`` does)."""
        return SizePlan(self.base + int(self.offsets[count]), self.sizes[count:], dict(self.dropped))


def even_out_sizes(plan: SizePlan, world_size: int, drop_last: bool) -> SizePlan:
    """:func:`samplers.base.even_out` on sizes: the batch count made a multiple of ``world_size`` by splitting the
    largest batches (``drop_last=False``) or dropping the trailing batches (counted in ``dropped``)."""
    nb = plan.num_batches
    if nb % world_size == 0:
        return plan
    tail = None
    if not drop_last and plan.rows < -(-nb // world_size) * world_size:
        tail = "uneven_tail_too_few_rows_to_split"
    elif drop_last:
        tail = "uneven_tail"
    if tail is not None:
        keep = nb - nb % world_size
        dropped = dict(plan.dropped)
        dropped[tail] = dropped.get(tail, 0) + int(plan.offsets[-1] - plan.offsets[keep])
        return SizePlan(plan.base, plan.sizes[:keep], dropped)
    return SizePlan(plan.base, split_to_multiple(plan.sizes, world_size), dict(plan.dropped))


def arrange_sizes(first, segments: tuple[tuple[int, int], ...], world_size: int, drop_last: bool) -> SizePlan:
    """The rest of an epoch arranged for ``world_size`` ranks, as ``BatchSamplerBase._plans`` arranges it.

    Args:
        first: callable ``first(w) -> SizePlan``: the epoch's global plan evened out for ``w`` ranks.
        segments: ``((w, batches per rank consumed), ...)`` under earlier world sizes (elastic resume).
        world_size: ranks now.
        drop_last: as the sampler's.

    Returns:
        the plan whose batches ``r, r + W, ...`` are rank ``r``'s from now on.
    """
    if not segments:
        return first(world_size)
    w0, k0 = segments[0]
    plan = first(w0).skip(k0 * w0)
    for w, k in segments[1:]:
        plan = even_out_sizes(plan, w, drop_last).skip(k * w)
    return even_out_sizes(plan, world_size, drop_last)
